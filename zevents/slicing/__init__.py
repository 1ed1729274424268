"""The slicing service: real command-line slicers, their profiles, and sliced G-code straight into storage."""
