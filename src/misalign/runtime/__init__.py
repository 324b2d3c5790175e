"""Process-level support: files, progress, text, sizes, optional imports, reaping."""
