"""The gate kinds by name, each with what it adds (torch-free: the command line lists them in its --help).

``attnkit.gate.gating.GATE_KINDS`` builds each kind's module; its keys are these.
"""

KIND_HELP: dict[str, str] = {
    "headwise": "one sigmoid gate per head (Qiu et al. 2025's G1)",
    "elementwise": "one sigmoid gate per element of each head's output",
    "mlp": "one gate per head from a small MLP (Linear, ReLU, Linear)",
}
