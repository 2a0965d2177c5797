/* The public AscendCL headers gs-host's bindings are generated from (see regen.sh). */
#include "acl/acl.h"
#include "acl/ops/acl_cblas.h"
#include "acl/error_codes/rt_error_codes.h"
#include "acl/error_codes/ge_error_codes.h"
