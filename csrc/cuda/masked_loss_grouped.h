// The grouped forward of masked_loss_multitask_forward (csrc/cuda/masked_loss_grouped.cu; the design is at the top
// of masked_loss.h): every task with elements in one launch.
#pragma once

#include <vector>

#include "masked_loss.h"

namespace fastmtl {
namespace cuda {

// The grouped forward's task order (the op's tasks with elements, largest gradient first: the last tiles taken belong
// to the smallest task, so the op ends on its short finalize), or empty when the grouped launch does not apply: no
// task with elements, mixed prediction dtypes, more than kMaxGroupTasks such tasks, a target dtype the kernels do not
// take (the chain reports it), or a count too large for a count word.
std::vector<int> group_order(const LossTask* tasks, int n, const MultitaskBuffers& buf);

// The grouped forward: the state zeroed, tasks without elements given loss 0 and factor 0, then one launch over the
// schedule: every task's count tiles, then every task's loss tiles, in `order` (group_order's).
cudaError_t forward_grouped(const LossTask* tasks, int n, const std::vector<int>& order, const MultitaskBuffers& buf,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmtl
