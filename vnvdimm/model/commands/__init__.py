"""The ioctls of the emulated /dev, answered by the model: the nd envelope of /dev/ndctlN and
/dev/nmemN (envelope.py), the NFIT platform firmware behind it (platform.py: ARS and error
injection in ars.py, the Intel DIMM family in intel.py, label areas), and the block ioctls of
/dev/pmemN[s] (block.py). The transport that reaches these from a process is elsewhere
(vnvdimm.ioctl)."""
