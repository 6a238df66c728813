"""Studies: study files (validated by pydantic models), data and probes, the engine that runs
every config into one resumable run folder, the merge, and the claims checked on it."""
