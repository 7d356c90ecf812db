"""Media the project makes itself, for tests, benchmarks and demos: the sample videos with
their ground truth (`opensubject samples make`), many tiny load-test videos, and mutations
of valid files for fuzzing. Nothing in the pipeline imports this package."""
