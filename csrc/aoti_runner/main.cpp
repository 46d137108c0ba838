// teacache_aoti_runner: the embedded digits model's CFG Euler loop, run from C++ on AOTInductor packages.
//
//   teacache_aoti_runner CACHED.pt2 PLAIN.pt2 INPUTS.pt OUT.pt [REPEATS]
//
// CACHED.pt2 and PLAIN.pt2 are one CFG step of the transformer, with and without TeaCache, written by
// `python -m teacache_kernels export --model digits` (teacache_kernels/export.py). Each takes the inputs its
// metadata `teacache.inputs` names, in that order, and returns one velocity per CFG context (metadata
// `teacache.contexts`, conditional first, then unconditional); the cached one also returns each context's 0-d
// bool "reused" flag. TeaCache's state lives in the cached package's mutable buffers: it persists between
// run() calls and wraps to a new generation after `teacache.num_inference_steps` calls, so this loop never
// touches it.
//
// INPUTS.pt (torch.save'd dict of tensors) holds "hidden_states" (the initial noise), "sigmas" (steps + 1
// values, 1 -> 0), "guidance_scale" (0-d) and every other input the packages name. The loop is
// digits/sampling.py's: v = v_uncond + g * (v_cond - v_uncond); x = x + (sigma[i+1] - sigma[i]) * v.
//
// OUT.pt (torch.load-able dict): "latents" and "plain_latents" (the final latents of each package's first
// generation), "schedule" (uint8 [contexts, steps], 1 = reused), "cached_seconds" and "plain_seconds" (one
// wall time per timed generation), "repeats_identical" (every cached generation gave the first one's
// schedule and latents). Timing: one untimed generation of each package, then REPEATS rounds, each timing one
// generation of each package in turn (so drift on a shared machine hits both alike); the medians' ratio is
// the speedup printed.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);) {
    parts.push_back(item);
  }
  return parts;
}

std::string metadata(Loader& loader, const std::string& key) {
  auto all = loader.get_metadata();
  auto it = all.find(key);
  if (it == all.end()) {
    throw std::runtime_error("the package has no metadata '" + key + "': was it written by teacache_kernels.export?");
  }
  return it->second;
}

c10::Dict<c10::IValue, c10::IValue> load_inputs(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot read " + path);
  }
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::jit::pickle_load(bytes).toGenericDict();
}

at::Tensor input(const c10::Dict<c10::IValue, c10::IValue>& inputs, const std::string& name) {
  if (!inputs.contains(name)) {
    throw std::runtime_error("the inputs file has no tensor '" + name + "'");
  }
  return inputs.at(name).toTensor();
}

// One package and the inputs it takes that stay fixed over the loop; the loop fills in the rest.
struct Step {
  Loader loader;
  std::vector<std::string> names;  // the package's inputs, in order
  std::vector<at::Tensor> args;    // fixed inputs in place; hidden_states and timestep set per call
  size_t contexts = 0;
  bool cached = false;
  int hidden_index = -1, timestep_index = -1;

  Step(const std::string& path, const c10::Dict<c10::IValue, c10::IValue>& inputs) : loader(path) {
    names = split(metadata(loader, "teacache.inputs"), ',');
    contexts = split(metadata(loader, "teacache.contexts"), ',').size();
    cached = metadata(loader, "teacache.cached") == "1";
    if (contexts != 2) {
      throw std::runtime_error(path + ": a CFG step has 2 contexts (cond, uncond), this package has " +
                               std::to_string(contexts));
    }
    args.resize(names.size());
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i] == "hidden_states") {
        hidden_index = static_cast<int>(i);
      } else if (names[i] == "timestep") {
        timestep_index = static_cast<int>(i);
      } else {
        args[i] = input(inputs, names[i]);
      }
    }
    if (hidden_index < 0 || timestep_index < 0) {
      throw std::runtime_error(path + ": the package must take hidden_states and timestep");
    }
  }
};

struct Generation {
  at::Tensor latents;
  std::vector<std::vector<uint8_t>> schedule;  // [context][step], 1 = reused
  double seconds = 0.0;
};

// The Euler loop of digits/sampling.py::generate, with both CFG branches in one package call per step.
Generation generate(Step& step, const at::Tensor& noise, const at::Tensor& sigmas, double guidance) {
  const int64_t steps = sigmas.size(0) - 1;
  const int64_t batch = noise.size(0);
  std::vector<at::Tensor> flags;  // read after the loop: no host read inside it
  auto start = std::chrono::steady_clock::now();
  at::Tensor x = noise.clone();
  for (int64_t i = 0; i < steps; ++i) {
    const double sigma = sigmas[i].item<double>();
    const double dt = (sigmas[i + 1] - sigmas[i]).item<double>();  // float32 difference, as Python's float(...)
    std::vector<at::Tensor> args = step.args;
    args[step.hidden_index] = x;
    args[step.timestep_index] = at::full({batch}, sigma, x.options());
    std::vector<at::Tensor> out = step.loader.run(args);
    const at::Tensor& v_cond = out[0];
    const at::Tensor& v_uncond = out[1];
    at::Tensor v = v_uncond + guidance * (v_cond - v_uncond);
    x = x + dt * v;
    if (step.cached) {
      flags.push_back(out[2]);
      flags.push_back(out[3]);
    }
  }
  Generation g;
  g.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  g.latents = x;
  if (step.cached) {
    g.schedule.assign(2, std::vector<uint8_t>(steps));
    for (int64_t i = 0; i < steps; ++i) {
      for (int c = 0; c < 2; ++c) {
        g.schedule[c][i] = flags[2 * i + c].item<bool>() ? 1 : 0;
      }
    }
  }
  return g;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string letters(const std::vector<uint8_t>& schedule) {
  std::string s;
  for (uint8_t r : schedule) {
    s += r ? 'R' : 'C';
  }
  return s;
}

at::Tensor as_tensor(const std::vector<double>& v) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::cerr << "usage: " << argv[0] << " CACHED.pt2 PLAIN.pt2 INPUTS.pt OUT.pt [REPEATS]\n";
    return 2;
  }
  try {
    const int repeats = argc == 6 ? std::stoi(argv[5]) : 5;
    if (repeats < 1) {
      throw std::runtime_error("REPEATS must be at least 1");
    }
    auto inputs = load_inputs(argv[3]);
    const at::Tensor noise = input(inputs, "hidden_states");
    const at::Tensor sigmas = input(inputs, "sigmas");
    const double guidance = input(inputs, "guidance_scale").item<double>();
    c10::InferenceMode inference;  // as Python's torch.no_grad() around generate()

    Step cached(argv[1], inputs);
    Step plain(argv[2], inputs);
    if (!cached.cached || plain.cached) {
      throw std::runtime_error("the first package must be the TeaCache one, the second the uncached one");
    }
    const int64_t steps = sigmas.size(0) - 1;
    const int64_t num_steps = std::stoll(metadata(cached.loader, "teacache.num_inference_steps"));
    if (num_steps != steps) {
      throw std::runtime_error("the cached package wraps every " + std::to_string(num_steps) +
                               " calls, the inputs have " + std::to_string(steps) + " steps");
    }

    // The first generation of each: the result compared with Python's (and an untimed warm-up).
    Generation first = generate(cached, noise, sigmas, guidance);
    Generation first_plain = generate(plain, noise, sigmas, guidance);
    std::vector<double> cached_s, plain_s;
    bool identical = true;
    for (int r = 0; r < repeats; ++r) {
      Generation g = generate(cached, noise, sigmas, guidance);
      identical = identical && g.schedule == first.schedule && at::equal(g.latents, first.latents);
      cached_s.push_back(g.seconds);
      plain_s.push_back(generate(plain, noise, sigmas, guidance).seconds);
    }

    int64_t computed = 0;
    for (const auto& context : first.schedule) {
      computed += std::count(context.begin(), context.end(), uint8_t{0});
    }
    const double t_cached = median(cached_s), t_plain = median(plain_s);
    std::printf("schedule cond   %s\n", letters(first.schedule[0]).c_str());
    std::printf("schedule uncond %s\n", letters(first.schedule[1]).c_str());
    std::printf("computed %lld of %lld calls; repeated generations identical: %s\n",
                static_cast<long long>(computed), static_cast<long long>(2 * steps), identical ? "yes" : "NO");
    std::printf("generation (median of %d, %lld steps): uncached %.2f ms, TeaCache %.2f ms, speedup %.2fx\n",
                repeats, static_cast<long long>(steps), 1e3 * t_plain, 1e3 * t_cached, t_plain / t_cached);

    at::Tensor schedule = at::empty({2, steps}, at::kByte);
    for (int c = 0; c < 2; ++c) {
      for (int64_t i = 0; i < steps; ++i) {
        schedule[c][i] = first.schedule[c][i];
      }
    }
    c10::Dict<std::string, at::Tensor> out;
    out.insert("latents", first.latents);
    out.insert("plain_latents", first_plain.latents);
    out.insert("schedule", schedule);
    out.insert("cached_seconds", as_tensor(cached_s));
    out.insert("plain_seconds", as_tensor(plain_s));
    out.insert("repeats_identical", at::scalar_tensor(identical, at::kBool));
    std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(out));
    std::ofstream file(argv[4], std::ios::binary);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!file) {
      throw std::runtime_error(std::string("cannot write ") + argv[4]);
    }
    return identical ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "teacache_aoti_runner: " << e.what() << "\n";
    return 1;
  }
}
