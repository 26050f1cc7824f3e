"""Post-training tools for a trained MoE policy.

- `merge_experts`: merge each routed layer's experts into fewer groups guided by routing statistics (MC-SMoE),
  optionally compressing the merged experts to low rank plus a structured-sparse residual; writes an ordinary
  checkpoint.
- `routing_report`: what the routers learned: expert usage per embodiment / task / denoising step, a mutual
  information specialisation score, and decision trees distilled from the token-independent routers (SMOSE).

Both read the routers through `calibration.collect_routing`, which records every router call of the inference path.
"""
