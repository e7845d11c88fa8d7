"""The run folder and its records: format, markers, resume contract. Imports no torchtitan."""
