// Minimal assertion helpers for the plugin tests (no test framework required).
#ifndef ADASKIP_TESTS_CHECK_H
#define ADASKIP_TESTS_CHECK_H

#include <cmath>
#include <cstdio>

namespace adaskip_test {

inline int& failures() {
    static int count = 0;
    return count;
}

inline void checkTrue(bool ok, const char* what, const char* file, int line) {
    if (!ok) {
        std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what);
        ++failures();
    }
}

// |actual - expected| <= atol + rtol * |expected|; NaN never passes.
inline void checkNear(double actual, double expected, double atol, double rtol, const char* what, const char* file,
                      int line) {
    const double err = std::fabs(actual - expected);
    if (!(err <= atol + rtol * std::fabs(expected))) {
        std::fprintf(stderr, "%s:%d: FAILED: %s: got %.9g, expected %.9g (|diff| %.3g)\n", file, line, what, actual,
                     expected, err);
        ++failures();
    }
}

inline int finish(const char* name) {
    if (failures() == 0) {
        std::printf("%s: all checks passed\n", name);
        return 0;
    }
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
    return 1;
}

}  // namespace adaskip_test

#define CHECK(cond) ::adaskip_test::checkTrue((cond), #cond, __FILE__, __LINE__)
#define CHECK_NEAR(actual, expected, atol, rtol, what) \
    ::adaskip_test::checkNear((actual), (expected), (atol), (rtol), (what), __FILE__, __LINE__)

#endif  // ADASKIP_TESTS_CHECK_H
