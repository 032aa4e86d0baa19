/*
 * ferry uffd shim: LD_PRELOAD'ed into QEMU so that a userfaultfd exists *inside* QEMU.
 *
 * A userfaultfd belongs to the mm of the process that created it, so the agent cannot
 * create one for QEMU's memory itself. This constructor creates it in QEMU and parks it at a
 * known fd number (env FERRY_UFFD_FD, default 1023 = highest fd under the usual 1024 soft
 * limit); the agent later takes a copy with pidfd_getfd() and does all the setup
 * (UFFDIO_API, UFFDIO_REGISTER) from outside.
 *
 * Rules: never break the host process. On any failure do nothing; never clobber an fd that
 * is already open; keep errno as found. Always drop ourselves from LD_PRELOAD so QEMU's
 * children (helpers, scripts) do not inherit the shim; other preloads are kept.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SHIM_NAME "libferry_uffd_shim.so"
#define DEFAULT_FD 1023

static int is_shim_entry(const char *entry, size_t len)
{
	size_t n = strlen(SHIM_NAME);
	if (len < n || memcmp(entry + len - n, SHIM_NAME, n) != 0)
		return 0;
	return len == n || entry[len - n - 1] == '/';
}

/* Remove our own entries from LD_PRELOAD (separated by ':' or ' ', as ld.so accepts). */
static void strip_self_from_ld_preload(void)
{
	const char *v = getenv("LD_PRELOAD");
	if (v == NULL)
		return;
	size_t vlen = strlen(v);
	char *out = malloc(vlen + 1);
	if (out == NULL)
		return;
	size_t o = 0;
	const char *p = v;
	while (*p) {
		size_t len = strcspn(p, ": ");
		if (len > 0 && !is_shim_entry(p, len)) {
			if (o > 0)
				out[o++] = ':';
			memcpy(out + o, p, len);
			o += len;
		}
		p += len;
		if (*p)
			p++;
	}
	out[o] = '\0';
	if (o == 0)
		unsetenv("LD_PRELOAD");
	else
		setenv("LD_PRELOAD", out, 1);
	free(out);
}

static int target_fd(void)
{
	const char *s = getenv("FERRY_UFFD_FD");
	if (s == NULL || *s == '\0')
		return DEFAULT_FD;
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < 3 || v > INT_MAX)
		return -1;
	return (int)v;
}

__attribute__((constructor)) static void ferry_uffd_shim_init(void)
{
	int saved_errno = errno;
	int target = target_fd();

	/* Only take a free slot: clobbering an fd the process already owns would break it. */
	if (target >= 0 && fcntl(target, F_GETFD) == -1 && errno == EBADF) {
		long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (fd >= 0) {
			if (fd != target && dup3((int)fd, target, O_CLOEXEC) < 0) {
				/* no slot: give up quietly, the agent falls back */
			}
			if (fd != target)
				close((int)fd);
		}
	}

	strip_self_from_ld_preload();
	errno = saved_errno;
}
