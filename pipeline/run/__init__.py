"""The steps of one embedding run; pipeline.embed puts them in order."""
