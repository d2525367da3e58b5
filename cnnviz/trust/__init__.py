"""Checks that tell whether to believe the pictures.

`reference` recomputes the forward pass in numpy (`cnnviz verify`); `sanity` and `faithfulness`
test the explanation methods (model randomization, class sensitivity, deletion/insertion);
`shortcut` measures reliance on a known spurious cue; `cnnviz.explain.registry` runs every
method by name for them.
"""
