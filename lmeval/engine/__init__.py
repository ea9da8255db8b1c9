"""The engine: config, documents, plan, passes, parts, resume, merge, lock, files and executors. It knows no metric."""
