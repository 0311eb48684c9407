# Dependencies of the C++ runtime, system packages first:
#   ONNX Runtime  find_package(onnxruntime) or headers in /usr/include + libonnxruntime; otherwise the C/C++ headers of
#                 Debian trixie's libonnxruntime-dev (fetched by fetch_deps.sh into the build dir) compiled against
#                 and linked to the PyPI wheel's onnxruntime/capi/libonnxruntime.so.1.* (its C API is backward
#                 compatible with the headers' API version).
#   nlohmann/json find_package(nlohmann_json), otherwise Debian's header-only nlohmann-json3-dev, fetched the same way.
#   OpenSSL       libcrypto for the manifest's SHA-256 file digests.
# Result: the targets adaskip::onnxruntime, nlohmann_json::nlohmann_json, OpenSSL::Crypto, and ADASKIP_ORT_RPATH_DIR.
# Included by cpp/runtime and cpp/ortops: resolved once per build.
include_guard(GLOBAL)

set(ADASKIP_DEPS_DIR "${CMAKE_BINARY_DIR}/_deps/debian" CACHE PATH "where fetch_deps.sh caches and unpacks .debs")
set(ADASKIP_ORT_LIBRARY "" CACHE FILEPATH "libonnxruntime to link (default: system package, else the PyPI wheel's)")

function(_adaskip_fetch_debs)
  execute_process(COMMAND bash "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../fetch_deps.sh" "${ADASKIP_DEPS_DIR}" ${ARGN}
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "adaskip runtime: fetching ${ARGN} from Debian failed (see above); install them or pass "
                        "their locations (onnxruntime_DIR, nlohmann_json_DIR)")
  endif()
endfunction()

# -- what the system lacks, fetched in one go -------------------------------------------------------------------
find_package(nlohmann_json 3.2 CONFIG QUIET)
find_package(onnxruntime CONFIG QUIET)
find_path(ADASKIP_ORT_INCLUDE_DIR onnxruntime_cxx_api.h PATH_SUFFIXES onnxruntime)
set(_missing "")
if(NOT nlohmann_json_FOUND)
  list(APPEND _missing nlohmann-json3-dev)
endif()
if(NOT (onnxruntime_FOUND AND NOT ADASKIP_ORT_LIBRARY) AND NOT ADASKIP_ORT_INCLUDE_DIR)
  list(APPEND _missing libonnxruntime-dev)
endif()
if(_missing)
  _adaskip_fetch_debs(${_missing})
endif()

# -- nlohmann/json -------------------------------------------------------------------------------------------------
if(nlohmann_json_FOUND)
  set(ADASKIP_JSON_SOURCE "system package (${nlohmann_json_DIR})")
else()
  find_package(nlohmann_json 3.2 CONFIG REQUIRED PATHS "${ADASKIP_DEPS_DIR}/root/usr/share/cmake" NO_DEFAULT_PATH)
  set(ADASKIP_JSON_SOURCE "Debian nlohmann-json3-dev fetched into ${ADASKIP_DEPS_DIR}")
endif()

# -- OpenSSL -------------------------------------------------------------------------------------------------------
find_package(OpenSSL COMPONENTS Crypto)
if(NOT OpenSSL_FOUND)
  message(FATAL_ERROR "adaskip runtime: OpenSSL's libcrypto (Debian: libssl-dev) is needed to check engine digests")
endif()

# -- ONNX Runtime --------------------------------------------------------------------------------------------------
add_library(adaskip::onnxruntime INTERFACE IMPORTED GLOBAL)  # GLOBAL: cpp/ortops uses its headers too
set(ADASKIP_ORT_RPATH_DIR "")
if(onnxruntime_FOUND AND NOT ADASKIP_ORT_LIBRARY)
  target_link_libraries(adaskip::onnxruntime INTERFACE onnxruntime::onnxruntime)
  set(ADASKIP_ORT_SOURCE "system package (${onnxruntime_DIR})")
else()
  if(NOT ADASKIP_ORT_LIBRARY)
    find_library(_adaskip_system_ort onnxruntime)
  endif()
  if(ADASKIP_ORT_INCLUDE_DIR AND _adaskip_system_ort)
    set(_ort_lib "${_adaskip_system_ort}")
    set(ADASKIP_ORT_SOURCE "system headers ${ADASKIP_ORT_INCLUDE_DIR} and ${_ort_lib}")
  else()
    if(NOT ADASKIP_ORT_INCLUDE_DIR)
      set(ADASKIP_ORT_INCLUDE_DIR "${ADASKIP_DEPS_DIR}/root/usr/include/onnxruntime" CACHE PATH "" FORCE)
    endif()
    set(_ort_lib "${ADASKIP_ORT_LIBRARY}")
    if(NOT _ort_lib)
      # README's venv (the one with the onnxruntime wheel) unless another Python is named
      if(NOT Python3_EXECUTABLE AND EXISTS "${CMAKE_SOURCE_DIR}/.venv/bin/python")
        set(Python3_EXECUTABLE "${CMAKE_SOURCE_DIR}/.venv/bin/python")
      endif()
      find_package(Python3 COMPONENTS Interpreter REQUIRED)
      execute_process(
        COMMAND "${Python3_EXECUTABLE}" -c
                "import glob, importlib.util as u; s = u.find_spec('onnxruntime'); d = s.submodule_search_locations[0] if s else ''; print(';'.join(sorted(glob.glob(d + '/capi/libonnxruntime.so.1.*'))))"
        OUTPUT_VARIABLE _found OUTPUT_STRIP_TRAILING_WHITESPACE)
      list(LENGTH _found _n)
      if(_n EQUAL 0)
        message(FATAL_ERROR "adaskip runtime: no ONNX Runtime library: the Python at ${Python3_EXECUTABLE} has no "
                            "onnxruntime wheel (pip install onnxruntime, pass -DPython3_EXECUTABLE=<venv python>, or "
                            "-DADASKIP_ORT_LIBRARY=<libonnxruntime.so>)")
      endif()
      list(GET _found -1 _ort_lib)
    endif()
    # The wheel ships libonnxruntime.so.1.X.Y with SONAME libonnxruntime.so.1: give the loader that name next to
    # the binaries' RPATH instead of copying the library.
    set(_link_dir "${CMAKE_BINARY_DIR}/_deps/onnxruntime-lib")
    file(MAKE_DIRECTORY "${_link_dir}")
    file(REAL_PATH "${_ort_lib}" _ort_real)
    file(CREATE_LINK "${_ort_real}" "${_link_dir}/libonnxruntime.so.1" SYMBOLIC)
    set(_ort_lib "${_link_dir}/libonnxruntime.so.1")
    set(ADASKIP_ORT_RPATH_DIR "${_link_dir}")
    set(ADASKIP_ORT_SOURCE "headers ${ADASKIP_ORT_INCLUDE_DIR}, library ${_ort_real}")
  endif()
  target_include_directories(adaskip::onnxruntime INTERFACE "${ADASKIP_ORT_INCLUDE_DIR}")
  target_link_libraries(adaskip::onnxruntime INTERFACE "${_ort_lib}")
  if(NOT ADASKIP_ORT_RPATH_DIR)
    get_filename_component(ADASKIP_ORT_RPATH_DIR "${_ort_lib}" DIRECTORY)
  endif()
endif()

message(STATUS "adaskip runtime: ONNX Runtime from ${ADASKIP_ORT_SOURCE}")
message(STATUS "adaskip runtime: nlohmann/json from ${ADASKIP_JSON_SOURCE}")
