"""Graph passes of the gear backend: `match` finds attention sites and their
KV-appends in a Dynamo FX graph, `rewrite` replaces them with `gear` ops."""
