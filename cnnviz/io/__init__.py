"""How files are written, whatever they are: atomic writes (temporary name, then rename) and run
locks."""
