"""The names `create-hypernetwork` offers, torch-free (the CLI's parser is built for --help)."""

# Loaded by both A1111 and ComfyUI; what create offers. "swish" is Hardswish in both (not SiLU).
ACTIVATION_NAMES = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
# --init spelling -> the file's weight_initialization value (A1111's UI choices).
INITS = {"normal": "Normal", "xavier_uniform": "XavierUniform", "xavier_normal": "XavierNormal",
         "kaiming_uniform": "KaimingUniform", "kaiming_normal": "KaimingNormal"}
