"""An output folder's storage: its layout and summary (`outputs`), Lance
reads and writes (`lance_io`), adding columns in place (`lance_columns`), and
the curated view (`views`)."""
