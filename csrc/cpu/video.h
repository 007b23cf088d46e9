// CPU (multithreaded C++) implementation of the video pixel path; see echofast.h for the
// descriptors and echofast_video.h for the formulas.
#pragma once

#include "echofast.h"

namespace echofast {
namespace cpu {

// Throw std::invalid_argument naming the field and its value when a descriptor is
// inconsistent (negative sizes, unknown enums, null data, bad channel counts). `where` prefixes
// the message. Does not (cannot) check that the memory behind the pointers is large enough:
// the Python caller does that.
void check_planes(const echofast_planes& planes, const char* where);
void check_frames(const echofast_frames& frames, const char* where);
// Everything the conversions below check before touching memory (also used before CUDA
// launches): both descriptors, matching frame counts / sizes, channel and enum values.
void check_planes_to_frames(const echofast_planes& src, const echofast_frames& dst, int resize);
void check_frames_to_planes(const echofast_frames& src, const echofast_planes& dst);

// planes (T, H, W) -> frames (T, H', W', C). Requires src.frames == dst.frames and, for packed
// input, src.channels == dst.channels or src.channels == 1. `threads` <= 0 uses every core.
void planes_to_frames(const echofast_planes& src, const echofast_frames& dst, int resize,
                      int threads);

// frames (T, H, W, C) -> yuvj420p planes (T, H, W) with chroma (ceil(H/2), ceil(W/2)).
void frames_to_planes(const echofast_frames& src, const echofast_planes& dst, int threads);

}  // namespace cpu
}  // namespace echofast
