"""The CXL core's device model (drivers/cxl) as the kernel's cxl_test module exercises it:
platform devices standing in for the ACPI0017 object, host bridges, root ports and switch
ports; the cxl bus with its root port (`rootN`), host-bridge and switch ports (`portN`),
endpoint ports (`endpointN`), HDM decoders (`decoderP.D`), memory devices (`memN`) and
regions (`regionN`), and the drivers that bind them.

Modules, each importing only those listed before it: `common` (constants, encodings, the
platform devices, the cxl device base), `security` (cxl_security_ops, mem.c's mock security),
`memdev`, `region`, `decoder`, `pmem` (cxl_pmem's bridge to libnvdimm), `port` (ports and
the topology), `drivers` (bus types, drivers, register()).
"""

from vnvdimm.model.cxl.common import CXL_BUS, CXL_MODULES, PLATFORM_BUS, PlatformDev, Window
from vnvdimm.model.cxl.decoder import CxlDecoder
from vnvdimm.model.cxl.drivers import register
from vnvdimm.model.cxl.memdev import CxlMemdev
from vnvdimm.model.cxl.port import CxlPort, CxlTopology
from vnvdimm.model.cxl.region import CxlRegion

__all__ = ["CXL_BUS", "CXL_MODULES", "PLATFORM_BUS", "CxlDecoder", "CxlMemdev", "CxlPort", "CxlRegion",
           "CxlTopology", "PlatformDev", "Window", "register"]
