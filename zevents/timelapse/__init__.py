"""Timelapse: frames from a camera on every layer (or z change, or timer), movies rendered by ffmpeg."""
