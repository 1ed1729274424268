"""The hooks service: OctoPrint's ``events.subscriptions`` run on bus events (``service``), the subscriptions'
parsing and validation (``subscriptions``) and the processes they start (``runner``)."""
