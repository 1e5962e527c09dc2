"""Graph passes of the gear backend: `match` recognises attention sites and
their KV-appends in a Dynamo FX graph, `sites` adds the caches and softmaxes
no recognised form fuses, `rewrite` replaces them with `gear` ops;
`lorc` (latent K/V by SVD of the projections, with `lorc_fused` for its
fused kernel) and `mla` (an MLA layer's attention absorbed over its latent)
are the rewrites' special forms."""
