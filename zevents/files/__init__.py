"""The files service: storage, watched folder, metadata analysis."""
