"""The files service: storage (local uploads and the printer's SD card), the watched folder, the metadata analysis
queue and print history; see service.py (the process) and channel.py (its command API)."""
