// psft_notebook_repl: runs a notebook's code cells, one at a time and in
// order, in clang's incremental C++ interpreter (clang::Interpreter from
// libclang-cpp, the engine of clang-repl and of the xeus-cpp Jupyter
// kernel), the way a kernel runs them: each cell is handed to the
// interpreter whole, as written, and everything a cell declares stays
// visible to the cells after it. notebook_to_cpp.py --repl drives it.
//
//   psft_notebook_repl [--name NOTEBOOK] [--Xcc=ARG]... CELL_FILE...
//
// --Xcc passes ARG to the interpreter's compiler (-std=c++20, -D..., -I...),
// as clang-repl's --Xcc and a xeus-cpp kernelspec's argv do. Each
// CELL_FILE (cell-<index>.cpp) holds one code cell. Its `#pragma cling`
// lines are applied first, as xeus-cling applies them: add_include_path
// adds an include directory, add_library_path a directory that load
// searches, load opens a shared library whose symbols the interpreted code
// can then call. The pragma lines are then blanked, which keeps the
// diagnostics' line numbers, and the cell is parsed and executed.
//
// Exits 0 when every cell ran; 1 at the first cell that does not compile,
// does not link in the JIT, or throws a C++ exception, naming the notebook
// and the cell; a crash ends the process with its signal.
#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <clang/Basic/FileManager.h>
#include <clang/Frontend/CompilerInstance.h>
#include <clang/Interpreter/Interpreter.h>
#include <clang/Lex/DirectoryLookup.h>
#include <clang/Lex/HeaderSearch.h>
#include <clang/Lex/Preprocessor.h>
#include <llvm/ExecutionEngine/Orc/EPCEHFrameRegistrar.h>
#include <llvm/ExecutionEngine/Orc/JITTargetMachineBuilder.h>
#include <llvm/ExecutionEngine/Orc/LLJIT.h>
#include <llvm/ExecutionEngine/Orc/ObjectLinkingLayer.h>
#include <llvm/Support/Error.h>
#include <llvm/Support/TargetSelect.h>
#include <llvm/TargetParser/Host.h>

#ifndef PSFT_CLANG_RESOURCE_DIR
#error "PSFT_CLANG_RESOURCE_DIR must name clang's resource directory (CMakeLists.txt sets it)"
#endif

namespace {

// Note [Large code model]
// LLJIT's default for x86-64 Linux, JITLink with the small code model,
// reaches symbols through signed 32-bit displacements, and some references
// from a cell's code into an earlier cell's are direct (__dso_handle, a
// deduplicated DW.ref.__gxx_personality_v0). Each cell's code is allocated
// on its own, wherever mmap puts it; with the CUDA wheel's libtorch.so
// loaded (libtorch_cuda.so and CUDA's libraries, about 2 GB of mappings)
// and the AST of <torch/torch.h> in memory, later cells' code lands more
// than 2 GB away from the first cells': "relocation target ... is out of
// range of Delta32 fixup" (clang-repl 19 and 22 both fail so on the
// notebooks). The large code model with absolute addresses has no range to
// leave; the code is slightly bigger.

// Note [Load into the global scope]
// `#pragma cling load` opens the library with RTLD_GLOBAL, as xeus-cling
// does and as LD_PRELOAD would, and the JIT finds its symbols through the
// process's global scope, where the executable comes first. clang's
// Interpreter::LoadDynamicLibrary (clang-repl's %lib) searches the library
// and its dependencies instead, before the process: a symbol that this
// executable holds a copy-relocated definition of, std::cout among them,
// then resolves to libstdc++'s unused original, and the first
// `std::cout <<` in a cell crashes.

/// Value printing of a bare expression (no trailing `;`) is clang-repl's
/// runtime, which only Interpreter::create() sets up; without it the
/// expression is evaluated and its value not printed.
class NoValuePrinting final : public clang::RuntimeInterfaceBuilder {
 public:
  TransformExprFunction* getPrintValueTransformer() override { return &keep; }

 private:
  static clang::ExprResult keep(clang::RuntimeInterfaceBuilder*, clang::Expr* expr,
                                llvm::ArrayRef<clang::Expr*>) {
    return expr;
  }
};

/// clang::Interpreter with the JIT of Note [Large code model].
class NotebookInterpreter final : public clang::Interpreter {
 public:
  static llvm::Expected<std::unique_ptr<NotebookInterpreter>> create(
      std::unique_ptr<clang::CompilerInstance> compiler) {
    const std::string triple = compiler->getTargetOpts().Triple;
    auto machine = triple == llvm::sys::getProcessTriple()
                       ? llvm::orc::JITTargetMachineBuilder::detectHost()
                       : llvm::orc::JITTargetMachineBuilder(llvm::Triple(triple));
    if (!machine) return machine.takeError();
    machine->setCodeModel(llvm::CodeModel::Large);
    machine->setRelocationModel(llvm::Reloc::Static);
    auto jit = std::make_unique<llvm::orc::LLJITBuilder>();
    jit->setJITTargetMachineBuilder(std::move(*machine));
    // Setting a linking layer keeps LLJIT from choosing JITLink with the
    // small code model; this is its JITLink layer otherwise.
    jit->setObjectLinkingLayerCreator(
        [](llvm::orc::ExecutionSession& session,
           const llvm::Triple&) -> llvm::Expected<std::unique_ptr<llvm::orc::ObjectLayer>> {
          auto layer = std::make_unique<llvm::orc::ObjectLinkingLayer>(session);
          auto registrar = llvm::orc::EPCEHFrameRegistrar::Create(session);
          if (!registrar) return registrar.takeError();
          layer->addPlugin(std::make_unique<llvm::orc::EHFrameRegistrationPlugin>(
              session, std::move(*registrar)));
          return std::move(layer);
        });
    llvm::Error error = llvm::Error::success();
    std::unique_ptr<NotebookInterpreter> interpreter(
        new NotebookInterpreter(std::move(compiler), error, std::move(jit)));
    if (error) return std::move(error);
    return std::move(interpreter);
  }

 protected:
  std::unique_ptr<clang::RuntimeInterfaceBuilder> FindRuntimeInterface() override {
    return std::make_unique<NoValuePrinting>();
  }

 private:
  NotebookInterpreter(std::unique_ptr<clang::CompilerInstance> compiler, llvm::Error& error,
                      std::unique_ptr<llvm::orc::LLJITBuilder> jit)
      : clang::Interpreter(std::move(compiler), error, std::move(jit)) {}
};

std::string message(llvm::Error error) {
  std::string text;
  llvm::handleAllErrors(std::move(error),
                        [&](const llvm::ErrorInfoBase& info) { text += info.message(); });
  return text;
}

/// xeus-cling's #pragma cling add_include_path: an -I directory, from now on.
bool add_include_path(clang::Interpreter& interpreter, const std::string& path) {
  clang::CompilerInstance& compiler = *interpreter.getCompilerInstance();
  const auto directory = compiler.getFileManager().getOptionalDirectoryRef(path);
  if (!directory) return false;
  compiler.getHeaderSearchOpts().AddPath(path, clang::frontend::Angled, /*IsFramework=*/false,
                                         /*IgnoreSysRoot=*/true);
  compiler.getPreprocessor().getHeaderSearchInfo().AddSearchPath(
      clang::DirectoryLookup(*directory, clang::SrcMgr::C_User, /*isFramework=*/false),
      /*isAngled=*/true);
  return true;
}

struct Session {
  std::string notebook;
  std::vector<std::string> library_paths;
};

/// Applies the cell's #pragma cling lines and blanks them; false (with the
/// reason on stderr) if one cannot be applied.
bool apply_pragmas(clang::Interpreter& interpreter, Session& session, const std::string& cell,
                   std::string& code) {
  static const std::regex pragma(R"re(^\s*#\s*pragma\s+cling\s+(\w+)\s*\(\s*"([^"]*)"\s*\)\s*$)re");
  std::istringstream lines(code);
  std::ostringstream kept;
  std::string line;
  bool ok = true;
  while (std::getline(lines, line)) {
    std::smatch match;
    if (!std::regex_match(line, match, pragma)) {
      if (line.find("#pragma cling") != std::string::npos) {
        std::cerr << session.notebook << " " << cell << ": unrecognised pragma: " << line << "\n";
        ok = false;
      }
      kept << line << "\n";
      continue;
    }
    kept << "\n";
    const std::string what = match[1], argument = match[2];
    if (what == "add_include_path") {
      if (!add_include_path(interpreter, argument)) {
        std::cerr << session.notebook << " " << cell << ": no include directory " << argument
                  << "\n";
        ok = false;
      }
    } else if (what == "add_library_path") {
      session.library_paths.push_back(argument);
    } else if (what == "load") {
      std::string library = argument;
      for (const std::string& directory : session.library_paths) {
        if (std::ifstream(directory + "/" + argument).good()) {
          library = directory + "/" + argument;
          break;
        }
      }
      // Note [Load into the global scope]
      if (dlopen(library.c_str(), RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
        std::cerr << session.notebook << " " << cell << ": cannot load " << library << ": "
                  << dlerror() << "\n";
        ok = false;
      }
    } else {
      std::cerr << session.notebook << " " << cell << ": unsupported pragma cling " << what << "\n";
      ok = false;
    }
  }
  code = kept.str();
  return ok;
}

/// "cell-7.cpp" -> "cell 7".
std::string cell_name(const std::string& path) {
  std::string name = path.substr(path.find_last_of('/') + 1);
  name = name.substr(0, name.rfind(".cpp"));
  for (char& c : name) {
    if (c == '-') c = ' ';
  }
  return name;
}

}  // namespace

int main(int argc, char** argv) {
  Session session{"notebook", {}};
  std::vector<std::string> compiler_args = {"-resource-dir", PSFT_CLANG_RESOURCE_DIR};
  std::vector<std::string> cells;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--name" && i + 1 < argc) {
      session.notebook = argv[++i];
    } else if (arg.rfind("--Xcc=", 0) == 0) {
      compiler_args.push_back(arg.substr(6));
    } else if (arg.rfind("--", 0) == 0) {
      std::cerr << "psft_notebook_repl: unknown option " << arg
                << "\nusage: psft_notebook_repl [--name NOTEBOOK] [--Xcc=ARG]... CELL_FILE...\n";
      return 2;
    } else {
      cells.push_back(arg);
    }
  }

  llvm::InitializeNativeTarget();
  llvm::InitializeNativeTargetAsmPrinter();
  llvm::InitializeNativeTargetAsmParser();  // inline asm (Eigen's among others)

  std::vector<const char*> compiler_argv;
  for (const std::string& arg : compiler_args) compiler_argv.push_back(arg.c_str());
  clang::IncrementalCompilerBuilder builder;
  builder.SetCompilerArgs(compiler_argv);
  auto compiler = builder.CreateCpp();
  if (!compiler) {
    std::cerr << session.notebook
              << ": cannot set up the compiler: " << message(compiler.takeError()) << "\n";
    return 1;
  }
  auto interpreter = NotebookInterpreter::create(std::move(*compiler));
  if (!interpreter) {
    std::cerr << session.notebook
              << ": cannot start the interpreter: " << message(interpreter.takeError()) << "\n";
    return 1;
  }

  for (const std::string& path : cells) {
    const std::string cell = cell_name(path);
    std::ifstream file(path);
    if (!file) {
      std::cerr << session.notebook << ": cannot read " << path << "\n";
      return 1;
    }
    std::ostringstream text;
    text << file.rdbuf();
    std::string code = text.str();
    std::cout << "--- " << session.notebook << " " << cell << std::endl;
    const auto start = std::chrono::steady_clock::now();
    bool ok = apply_pragmas(**interpreter, session, cell, code);
    std::string failure;
    if (ok) {
      try {
        if (llvm::Error error = (*interpreter)->ParseAndExecute(code)) {
          failure = message(std::move(error));
        }
      } catch (const std::exception& e) {
        failure = std::string("threw: ") + e.what();
      } catch (...) {
        failure = "threw a non-std exception";
      }
    }
    std::cout.flush();
    std::fflush(stdout);
    if (!ok || !failure.empty()) {
      std::cerr << session.notebook << " " << cell << " failed in the interpreter"
                << (failure.empty() ? "" : ": " + failure) << "\n";
      return 1;
    }
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    std::fprintf(stderr, "(%s %s: %.1f s)\n", session.notebook.c_str(), cell.c_str(),
                 seconds.count());
  }
  return 0;
}
