"""The large-batch study: the critical batch size by sweep (sweep.py, report.py) and predicted
online from the gradient noise scale (gns.py with the torch/TF helpers gns_torch.py, gns_tf.py)."""
