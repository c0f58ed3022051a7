// The CPU wheel of torch lacks this generated header; used only by the nvcc compile-only check.
#pragma once
