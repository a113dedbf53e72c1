"""The seed example: synthetic calorimeter events in HDF5 to torch_geometric batches.

``python -m torchqueue.demo`` generates a small dataset, runs the pipeline and a
plain ``torch.utils.data.DataLoader`` doing the same work, and prints both rates
and the pipeline's ``stats()``.
"""
