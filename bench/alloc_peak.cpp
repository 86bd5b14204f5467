// A CPU allocator for torch that counts: the bytes of live torch CPU tensors and their peak.
//
// bench/plan_probe.py installs it (c10::SetCPUAllocator) after the stage's imports, so every
// tensor the stage allocates afterwards comes through here: what CUDA's caching allocator reports
// as max_memory_allocated, for the CPU. Tensors made before it was installed keep their own
// deleter and are not counted (the import baseline). Memory comes from c10's own alloc_cpu /
// free_cpu, as torch's default CPU allocator's; sizes are the bytes asked for.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {

std::atomic<int64_t> live_bytes{0};
std::atomic<int64_t> peak_bytes{0};
std::mutex sizes_mutex;
// Leaked on purpose: tensors may be freed during interpreter shutdown, after static destructors.
auto* sizes = new std::unordered_map<void*, size_t>();

void raise_peak(int64_t now) {
  int64_t seen = peak_bytes.load();
  while (now > seen && !peak_bytes.compare_exchange_weak(seen, now)) {
  }
}

void counted_free(void* data) {
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(sizes_mutex);
    auto found = sizes->find(data);
    if (found != sizes->end()) {
      n = found->second;
      sizes->erase(found);
    }
  }
  live_bytes -= static_cast<int64_t>(n);
  c10::free_cpu(data);
}

struct CountingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* data = c10::alloc_cpu(n);
    if (data != nullptr) {
      {
        std::lock_guard<std::mutex> lock(sizes_mutex);
        (*sizes)[data] = n;
      }
      raise_peak(live_bytes += static_cast<int64_t>(n));
    }
    return {data, data, &counted_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counted_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingAllocator counting;

}  // namespace

extern "C" {
void alloc_peak_install() { c10::SetCPUAllocator(&counting, /*priority=*/100); }
int64_t alloc_peak_live() { return live_bytes.load(); }
int64_t alloc_peak_peak() { return peak_bytes.load(); }
// Starts a new peak window at the bytes live now.
void alloc_peak_reset() { peak_bytes.store(live_bytes.load()); }
}
