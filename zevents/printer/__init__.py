"""The printer link: serial printers, the built-in virtual printer (``zevents.printer.virtual``), print jobs."""
