"""Conan 2 recipe for psft, a header-only C++17 library for LibTorch.

    conan create . --profile:all=<profile>

The package ships psft's own CMake package (psftConfig.cmake, installed by
psft's CMake build), so consumers write find_package(psft) and link
psft::psft exactly as with a plain CMake install; Conan generates no config
file for psft.

LibTorch and Eigen are requirements, but they are normally provided by the
machine rather than built by Conan (a LibTorch source build takes hours):
declare them in the profile as platform requirements and point CMake at
LibTorch, e.g.

    [platform_requires]
    eigen/3.4.0
    libtorch/2.15.0
    [buildenv]
    CMAKE_PREFIX_PATH=+(path)/path/to/libtorch

psftConfig.cmake then finds them with find_dependency() at consume time.
"""

import os
import re

from conan import ConanFile
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load

required_conan_version = ">=2.0"


class PsftConan(ConanFile):
    name = "psft"
    description = "Proximal Supervised Fine-Tuning (PSFT) losses for LibTorch, header-only"
    license = "Apache-2.0"
    topics = ("pytorch", "libtorch", "fine-tuning", "reinforcement-learning", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "CMakeLists.txt", "cmake/*", "include/*", "LICENSE"
    no_copy_source = True

    def set_version(self):
        # One source of truth: the version in project() of CMakeLists.txt.
        text = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        match = re.search(r"project\(\s*psft\s+VERSION\s+([0-9.]+)", text)
        self.version = match.group(1)

    def layout(self):
        cmake_layout(self)

    def requirements(self):
        # transitive_headers: psft's public headers include Eigen's and ATen's.
        self.requires("eigen/[>=3.3 <4]", transitive_headers=True)
        self.requires("libtorch/[>=1.13 <3]", transitive_headers=True, transitive_libs=True)

    def package_id(self):
        # Header-only: one package for every configuration.
        self.info.clear()

    def generate(self):
        toolchain = CMakeToolchain(self)
        # Only the headers and the CMake package: no tests, benchmarks,
        # examples or CUDA targets.
        toolchain.cache_variables.update(
            {
                "PSFT_BUILD_TESTS": False,
                "PSFT_BUILD_BENCHMARKS": False,
                "PSFT_BUILD_EXAMPLES": False,
                "PSFT_HEADER_CHECK": False,
                "PSFT_CONSUMER_TESTS": False,
                "PSFT_CUDA": False,
                "PSFT_INSTALL": True,
            }
        )
        toolchain.generate()

    def build(self):
        # Configuring generates psftConfig.cmake; there is nothing to compile.
        cmake = CMake(self)
        cmake.configure()

    def package(self):
        cmake = CMake(self)
        cmake.install()
        copy(self, "LICENSE", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        # Consumers use psft's own psftConfig.cmake (it also finds LibTorch,
        # Eigen3 and OpenMP); CMakeToolchain puts this folder on
        # CMAKE_PREFIX_PATH.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs = [os.path.join("lib", "cmake", "psft")]
