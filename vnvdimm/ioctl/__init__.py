"""The ioctl channel between processes and the daemon: a unix socket per mount (server.py)
that the preload library (vnvdimm/preload) connects to for each ioctl on an emulated node, and
the protocol both speak (wire.py). What the ioctls do is the model's (vnvdimm.model.commands)."""
