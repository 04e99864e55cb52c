"""The steps of one embedding run; pipeline.embed puts them in order. They all log as
`pipeline.embed`, the run's logger, whatever module a line comes from."""
