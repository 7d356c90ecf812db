"""The export stage and its formats. Pure, bytes and records in and out: ``shards.py``
(WebDataset shards, records, stats helpers) and ``omnigen2.py`` (the OmniGen2 training
layout). I/O: ``query.py`` reads the database, ``sinks.py`` writes to the object store or a
local folder, and ``service.py`` runs the stage (plan, parts, finish) with them."""
