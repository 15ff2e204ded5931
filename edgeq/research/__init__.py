"""The research harness (apart from the product): sweeps over methods x k, Table I and Figure 1,
saliency-overlap reports."""
