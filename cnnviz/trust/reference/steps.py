"""`verify --explain`: a small network's forward pass written out by hand, step by step, and the
verify table."""

from __future__ import annotations

import numpy as np

from cnnviz.errors import CnnvizError
from cnnviz.trust.reference.activations import (
    NumpyActivation,
    Unsupported,
    layer_activation,
    resolve_activation,
)
from cnnviz.trust.reference.forward import (
    PRINTED_LENGTH,
    PRINTED_SIDE,
    VerifyReport,
    keras_layer_outputs,
    linear_layers,
    model_batch,
)
from cnnviz.trust.reference.layers import (
    LAYERS,
    activation_layer,
    as_pair,
    batch_norm_terms,
    compute_layer,
    conv2d_linear,
    identity_layer,
    layer_config,
    named_weights,
    pool_windows,
    window_origins,
)


def format_table(report: VerifyReport) -> str:
    """The report as an aligned plain-text table with a one-line verdict under it."""
    header = ("layer", "type", "output shape", "max |numpy - keras|", "status")
    lines = []
    for row in report.rows:
        if row.reason:
            difference, status = "-", f"UNSUPPORTED ({row.reason})"
        else:
            difference = f"{row.max_difference:.3e}"
            status = "ok" if row.ok else f"DIFFERS (> {report.tolerance:.0e})"
        shape = str(row.output_shape)
        lines.append((row.name, row.class_name, shape, difference, status))
    widths = [max(len(line[column]) for line in [header, *lines]) for column in range(4)]

    def render(cells) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells[:4], widths)]
        padded[3] = cells[3].rjust(widths[3])
        return "  ".join([*padded, cells[4]]).rstrip()

    rule = "  ".join("-" * width for width in [*widths, len(header[4])])
    table = [render(header), rule, *(render(line) for line in lines)]
    if report.ok:
        verdict = (f"OK: all {len(report.rows)} layers match Keras within "
                   f"{report.tolerance:.0e} on {report.image_count} images "
                   f"(max difference {report.max_difference:.3e})")
    else:
        failed = [row.name for row in report.rows if not row.ok]
        verdict = (f"FAILED: {len(failed)} of {len(report.rows)} layers unsupported or "
                   f"differing by more than {report.tolerance:.0e}: {', '.join(failed)}")
        unchecked = [f"{row.name} ({row.class_name})" for row in report.rows if row.reason]
        if unchecked:
            verdict += f"\ncannot check {len(unchecked)} layer(s): {', '.join(unchecked)}"
    return "\n".join([*table, "", verdict])


# ------------------------------------------------------------------------- written-out steps
def _number(value: float) -> str:
    value = float(value)
    if abs(value) < 5e-5:  # no "-0.0000"
        value = 0.0
    return f"{value:.4f}"


def _term(value: float) -> str:
    text = _number(value)
    return f"({text})" if text.startswith("-") else text


def _matrix(matrix: np.ndarray, indent: str) -> list[str]:
    width = max(len(_number(value)) for value in matrix.ravel())
    return [indent + "  ".join(_number(value).rjust(width) for value in row) for row in matrix]


def _vector(values: np.ndarray) -> str:
    return "[" + ", ".join(_number(value) for value in np.ravel(values)) + "]"


def _shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)


def _wrap_sum(prefix: str, terms: list[str], suffix: str, indent: str,
              separator: str = " + ") -> list[str]:
    """`prefix t1 + t2 + ... suffix`, wrapped at ~100 columns with continuation lines.

    A suffix that continues the sum starts with the separator (" + bias b = z").
    """
    lines, current = [], indent + prefix
    pieces = [term if position == 0 else separator + term for position, term in enumerate(terms)]
    if suffix:
        pieces.append(suffix)
    for position, piece in enumerate(pieces):
        if len(current) + len(piece) > 98 and position:
            lines.append(current + separator.rstrip())
            current = indent + "    " + piece.removeprefix(separator)
        else:
            current += piece
    lines.append(current)
    return lines


def _summary(values: np.ndarray) -> str:
    return (f"{_shape_text(values.shape)} values, min {_number(values.min())}, "
            f"max {_number(values.max())}, mean {_number(values.mean())}")


def _feature_maps(x: np.ndarray, title: str, indent: str) -> list[str]:
    """Each channel of one (H, W, C) map as a matrix, or the vector of a 1-D output.

    Maps wider or taller than PRINTED_SIDE (vectors longer than PRINTED_LENGTH) are
    summarised; a 28x28 matrix does not fit on a line.
    """
    if x.ndim == 1:
        shown = _vector(x) if x.size <= PRINTED_LENGTH else _summary(x)
        return [f"{indent}{title}: {shown}"]
    lines = []
    for channel in range(x.shape[-1]):
        if max(x.shape[:-1]) > PRINTED_SIDE:
            lines.append(f"{indent}{title}, channel {channel}: {_summary(x[..., channel])}")
            continue
        lines.append(f"{indent}{title}, channel {channel}:")
        lines.extend(_matrix(x[..., channel], indent + "    "))
    return lines


def _activation_lines(activation: NumpyActivation, before: np.ndarray, after: np.ndarray,
                      indent: str, max_positions: int) -> list[str]:
    if activation.name == "linear":
        return []
    lines = [f"{indent}{activation.name}: f(x) = {activation.formula}"]
    if activation.elementwise and before.size <= max_positions:
        pairs = [f"{activation.name}({_number(b)}) = {_number(a)}"
                 for b, a in zip(before.ravel(), after.ravel())]
        lines.extend(_wrap_sum("", pairs, "", indent + "    ", separator="; "))
    return lines


def _explain_conv(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    use_bias = config.get("use_bias", True)
    bias = np.asarray(weights[1], np.float64) if use_bias else np.zeros(kernel.shape[-1])
    strides, padding = as_pair(config["strides"]), config["padding"]
    dilation, groups = as_pair(config.get("dilation_rate", 1)), int(config.get("groups", 1))
    activation = resolve_activation(config.get("activation"))
    linear = conv2d_linear(x[None], kernel, bias, strides, padding, dilation, groups)[0]
    out = activation.function(linear)
    kh, kw, group_in, filters = kernel.shape
    lines = [f"{indent}{filters} filter(s) of {kh}x{kw}x{group_in}, strides "
             f"{_shape_text(strides)}, padding {padding!r}, activation {activation.name!r}"
             + (f", dilation {_shape_text(dilation)}" if dilation != (1, 1) else "")
             + (f", groups {groups}" if groups != 1 else "")]
    detail = linear.size <= max_positions
    if padding == "same":
        lines.append(f"{indent}'same' padding: cells outside the image count as 0")
    rows = window_origins(x.shape[0], kh, strides[0], padding, dilation[0])
    cols = window_origins(x.shape[1], kw, strides[1], padding, dilation[1])
    padded = np.pad(x, [(kh * dilation[0],) * 2, (kw * dilation[1],) * 2, (0, 0)])
    for f in range(filters):
        first_channel = (f // (filters // groups)) * group_in
        lines.append(f"{indent}filter {f}: bias = {_number(bias[f])}")
        for c in range(group_in):
            lines.append(f"{indent}  kernel, input channel {first_channel + c}:")
            lines.extend(_matrix(kernel[:, :, c, f], indent + "      "))
        if not detail:
            continue
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                r0, c0 = top + kh * dilation[0], left + kw * dilation[1]
                window = padded[r0:r0 + (kh - 1) * dilation[0] + 1:dilation[0],
                                c0:c0 + (kw - 1) * dilation[1] + 1:dilation[1],
                                first_channel:first_channel + group_in]
                last_row = top + (kh - 1) * dilation[0]
                last_col = left + (kw - 1) * dilation[1]
                lines.append(f"{indent}  output ({i}, {j}), filter {f}: window rows "
                             f"{top}..{last_row}, cols {left}..{last_col}")
                for c in range(group_in):
                    lines.append(f"{indent}    window, input channel {first_channel + c}:")
                    lines.extend(_matrix(window[:, :, c], indent + "        "))
                terms = [f"{_term(v)}*{_term(w)}"
                         for v, w in zip(window.ravel(), kernel[:, :, :, f].ravel())]
                tail = f" + bias {_term(bias[f])} = {_number(linear[i, j, f])}"
                if len(terms) > 27:
                    products = float(np.sum(window * kernel[:, :, :, f]))
                    lines.append(f"{indent}    sum(window * kernel) = {_number(products)}{tail}")
                else:
                    lines.extend(_wrap_sum("sum(window * kernel) = ", terms, tail,
                                           indent + "    "))
    if not detail:
        lines.append(f"{indent}(per-position sums left out: {linear.size} outputs > "
                     f"max_positions={max_positions})")
    if activation.name != "linear":
        lines.extend(_feature_maps(linear, "before activation", indent))
        lines.extend(_activation_lines(activation, linear, out, indent, max_positions))
    lines.extend(_feature_maps(out, "feature map", indent))
    return lines, out


def _explain_pool(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    kind = "max" if type(layer).__name__ == "MaxPooling2D" else "mean"
    window = as_pair(config["pool_size"])
    strides = as_pair(config["strides"] if config.get("strides") is not None else window)
    padding = config["padding"]
    out = pool_windows(x[None], "max" if kind == "max" else "average", window, strides, padding)[0]
    lines = [(f"{indent}{_shape_text(window)} windows, strides {_shape_text(strides)}, "
              f"padding {padding!r}: each output is the {kind} of its window")]
    if padding == "same":
        lines.append(f"{indent}'same' padding: cells outside the image are left out")
    if out.size <= max_positions:
        rows = window_origins(x.shape[0], window[0], strides[0], padding)
        cols = window_origins(x.shape[1], window[1], strides[1], padding)
        for c in range(x.shape[-1]):
            for i, top in enumerate(rows):
                for j, left in enumerate(cols):
                    cells = x[max(top, 0):top + window[0], max(left, 0):left + window[1], c]
                    values = ", ".join(_number(v) for v in cells.ravel())
                    lines.append(f"{indent}  output ({i}, {j}), channel {c}: rows "
                                 f"{max(top, 0)}..{min(top + window[0], x.shape[0]) - 1}, "
                                 f"cols {max(left, 0)}..{min(left + window[1], x.shape[1]) - 1}"
                                 f": {kind}({values}) = {_number(out[i, j, c])}")
    lines.extend(_feature_maps(out, "pooled", indent))
    return lines, out


def _explain_dense(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    if x.ndim != 1:  # Dense on a feature map acts per cell; show the result only
        return _explain_generic(layer, config, x, indent, max_positions)
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = (np.asarray(weights[1], np.float64) if config.get("use_bias", True)
            else np.zeros(kernel.shape[1]))
    activation = resolve_activation(config.get("activation"))
    z = x @ kernel + bias
    out = activation.function(z)
    lines = [(f"{indent}{kernel.shape[1]} unit(s), each z = x . w + b, activation "
              f"{activation.name!r}")]
    for unit in range(kernel.shape[1]):
        tail = f" + bias {_term(bias[unit])} = {_number(z[unit])}"
        if x.size > max_positions:
            products = float(x @ kernel[:, unit])
            lines.append(f"{indent}  unit {unit}: z = sum of {x.size} products x_i*w_i "
                         f"= {_number(products)}{tail}")
            continue
        terms = [f"{_term(v)}*{_term(w)}" for v, w in zip(x, kernel[:, unit])]
        lines.extend(_wrap_sum(f"unit {unit}: z = ", terms, tail, indent + "  "))
    lines.extend(_activation_lines(activation, z, out, indent, max_positions))
    lines.append(f"{indent}output: {_vector(out)}")
    return lines, out


def _explain_batch_norm(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    multiplier, offset = batch_norm_terms(layer, config, x.shape[-1])
    weights = named_weights(layer)
    epsilon = float(config["epsilon"])
    lines = [(f"{indent}inference: (x - moving_mean) / sqrt(moving_variance + {epsilon:g}) "
              f"* gamma + beta = x * a + b, per channel")]
    for c in range(x.shape[-1]):
        gamma = weights["gamma"][c] if config.get("scale", True) else 1.0
        beta = weights["beta"][c] if config.get("center", True) else 0.0
        lines.append(f"{indent}  channel {c}: mean {_number(weights['moving_mean'][c])}, "
                     f"variance {_number(weights['moving_variance'][c])}, gamma "
                     f"{_number(gamma)}, beta {_number(beta)} -> a = {_number(multiplier[c])}, "
                     f"b = {_number(offset[c])}")
    out = x * multiplier + offset
    lines.extend(_feature_maps(out, "normalized", indent))
    return lines, out


def _explain_generic(layer, config, x, indent, max_positions) -> tuple[list[str], np.ndarray]:
    class_name = type(layer).__name__
    out = compute_layer(layer, x[None])[0]
    lines = []
    if class_name == "Flatten":
        lines.append(f"{indent}{_shape_text(x.shape)} read row by row, channels last "
                     f"-> vector of {out.size}")
    elif class_name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        kind = "mean" if class_name == "GlobalAveragePooling2D" else "max"
        lines.append(f"{indent}{kind} of each channel over all {x.shape[0]}x{x.shape[1]} cells")
    elif LAYERS[class_name] is identity_layer:
        lines.append(f"{indent}identity at inference (active only while training)")
    elif class_name == "Rescaling":
        lines.append(f"{indent}x * {config['scale']} + {config['offset']}")
    elif LAYERS[class_name] is activation_layer:
        activation = (resolve_activation(config["activation"]) if class_name == "Activation"
                      else layer_activation(class_name, config))
        lines.extend(_activation_lines(activation, x, out, indent, max_positions))
    lines.extend(_feature_maps(out, "output", indent))
    return lines, out


_EXPLAINERS = {
    "Conv2D": _explain_conv,
    "MaxPooling2D": _explain_pool,
    "AveragePooling2D": _explain_pool,
    "Dense": _explain_dense,
    "BatchNormalization": _explain_batch_norm,
}


def explain_steps(model, image, *, max_params: int = 1000, max_positions: int = 64) -> str:
    """Write one image's forward pass out the way one checks a CNN by hand.

    The input matrix; for each conv output the window, the elementwise products summed plus the
    bias; the activation of each value; each pooling window and its max (or mean); the flattened
    vector; each Dense unit's dot product as terms + bias = z and its activation; finally the
    model's own (Keras) output beside the numbers written out. Numbers have 4 decimals; every
    value comes from the numpy reference pass, so the text and `verify` agree.

    Args:
        model: a small built Keras chain of supported layers (see `reference_forward`).
        image: one image (H, W, C) or a batch of one (1, H, W, C).
        max_params: refuse models with more parameters than this (the text would be unreadable).
        max_positions: per layer, write out per-position sums (and a Dense unit's products)
            only when it has at most this many outputs (inputs); bigger layers get their
            settings and results only. Maps over 12x12 and vectors over 64 are summarised
            (shape, min, max, mean).

    Returns:
        The steps as one multi-line string.

    Raises:
        CnnvizError: the model is too big, not a chain, has a layer without a numpy
            implementation, or the image does not fit it.
    """
    params = int(model.count_params())
    if params > max_params:
        raise CnnvizError(
            f"explain_steps writes every multiplication out; model {model.name!r} has {params} "
            f"parameters (max_params={max_params}). Use a model under {max_params} parameters "
            f"(e.g. one 3x3 Conv2D filter, a 2x2 max pool, Flatten, Dense(1)), or `verify` for "
            f"big models"
        )
    layers = linear_layers(model)
    batch = model_batch(model, image)
    if len(batch) != 1:
        raise CnnvizError(f"explain_steps takes one image; received a batch of {len(batch)}")
    missing = [f"{layer.name} ({type(layer).__name__})" for layer in layers
               if type(layer).__name__ not in LAYERS]
    if missing:
        raise CnnvizError(
            f"explain_steps cannot write out {', '.join(missing)}; supported layer types: "
            f"{', '.join(sorted(LAYERS))}"
        )
    x = batch[0].astype(np.float64)
    lines = [f"Input image {_shape_text(x.shape)} (rows x columns x channels):"]
    lines.extend(_feature_maps(x, "input", "  "))
    for number, layer in enumerate(layers, start=1):
        class_name = type(layer).__name__
        config = layer_config(layer)
        lines.append("")
        explainer = _EXPLAINERS.get(class_name, _explain_generic)
        try:
            body, out = explainer(layer, config, x, "  ", max_positions)
        except Unsupported as reason:
            raise CnnvizError(f"explain_steps cannot write out layer {layer.name!r}: "
                              f"{reason}") from None
        lines.append(f"Step {number}: {layer.name} ({class_name}) "
                     f"{_shape_text(x.shape)} -> {_shape_text(out.shape)}")
        lines.extend(body)
        x = out
    last = layers[-1].name
    keras_output = keras_layer_outputs(model, batch, paths=[last])[last][0]
    difference = float(np.max(np.abs(keras_output - x), initial=0.0))
    lines.extend([
        "",
        f"Output by hand: {_vector(x)}",
        f"Keras output:   {_vector(keras_output)} (max difference {difference:.1e})",
    ])
    return "\n".join(lines)
