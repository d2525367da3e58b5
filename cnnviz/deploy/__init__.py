"""After training: evaluate on a labelled split, predict image files, export to
SavedModel/TFLite/ONNX."""
