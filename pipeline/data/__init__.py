"""The image folders a pipeline reads: scanning into records, stable splits, the hash index; the ELPV demo."""
