"""Writing figures in batches: choosing images, chunks with a progress bar, captions, index.html."""
