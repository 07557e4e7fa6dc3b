"""Pure domain model: names, declarations, placement, errors. No I/O here."""
