"""One conversion, end to end: the in-memory core, file-to-file convert/validate, parity checks, atomic output,
deployment folders."""
