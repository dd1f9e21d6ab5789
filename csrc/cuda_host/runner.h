// The host runner's knobs and launch record (runner.cpp), for library.cpp's ops.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_host.h"

namespace segfp16 {
namespace host {

enum class BlockOrder { kInOrder, kReversed, kShuffled };

struct Schedule {
  BlockOrder block_order = BlockOrder::kInOrder;
  bool serial = false;           // one thread at a time between barriers, in `perm` order
  bool permute_threads = false;  // a seeded permutation of the threads (the start / turn order), new for each block
  uint64_t seed = 0;
  int sms = 132;                 // what cudaDevAttrMultiProcessorCount returns (H100 / H200 SXM)
  bool dry_run = false;          // check and record launches, run nothing (the launch-limit test at real sizes)
};

Schedule& schedule();

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem;
  bool ran;  // false: recorded in a dry run
};

std::vector<LaunchRecord> take_launches(bool clear);

}  // namespace host
}  // namespace segfp16
