"""Graph passes of the gear backend: `match` finds attention sites and their
KV-appends in a Dynamo FX graph, `rewrite` replaces them with `gear` ops;
`lorc` (latent K/V by SVD of the projections) and `mla` (an MLA layer's
attention absorbed over its latent) are the rewrites' special forms."""
