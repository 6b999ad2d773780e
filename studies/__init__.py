"""The findings' own scripts: research studies run by hand (docs/findings.md names the command of each), kept apart
from bench/, which holds benchmarks only (each times something against its alternative or the hardware's limit)."""
