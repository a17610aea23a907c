// A stand-in for the <xcpp/xdisplay.hpp> of the xeus-cling and xeus-cpp
// kernels, for the notebook runner (notebook_to_cpp.py --repl puts
// kernel_stub/ on the interpreter's include path), so that the notebooks'
// display hook is compiled and run as under a kernel. xcpp::display(value)
// takes the value's mime bundle from mime_bundle_repr(value), looked up as
// the kernels look it up (the overload next to the value's type, by
// argument-dependent lookup, else the text/plain fallback below), and,
// where a kernel would publish it to Jupyter, writes it to display-<n>.json
// in the working directory, for the runner to check.
#ifndef PSFT_NOTEBOOK_KERNEL_STUB_XCPP_XDISPLAY_HPP
#define PSFT_NOTEBOOK_KERNEL_STUB_XCPP_XDISPLAY_HPP

#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

namespace xcpp {

/// The kernels' fallback bundle: the value's operator<< as text/plain.
template <class T>
nlohmann::json mime_bundle_repr(const T& value) {
  std::ostringstream text;
  text << value;
  auto bundle = nlohmann::json::object();
  bundle["text/plain"] = text.str();
  return bundle;
}

namespace stub {
inline int displayed = 0;
}  // namespace stub

template <class T>
void display(const T& value) {
  using ::xcpp::mime_bundle_repr;
  const nlohmann::json bundle = mime_bundle_repr(value);
  std::ofstream("display-" + std::to_string(++stub::displayed) + ".json") << bundle.dump();
}

}  // namespace xcpp

#endif  // PSFT_NOTEBOOK_KERNEL_STUB_XCPP_XDISPLAY_HPP
