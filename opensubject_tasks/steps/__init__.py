"""Pure steps of the pipeline: arrays, records and plain data in, results out. No database,
no object store, no network; models come in as backend objects. The stage services
(services/) read rows and objects, call these, and write what they return."""
