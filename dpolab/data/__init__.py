"""Preference data: validated records and their loaders, tokenization with masks, collation into batches, and a
token-level inspector of one row."""
