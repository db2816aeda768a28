/*
 * vnvdimm's preload library: what a FUSE file system cannot do for the emulated /dev.
 *
 * The daemon serves /dev/ndctlN, /dev/nmemN, /dev/cxl/memN, /dev/daxR.M and /dev/pmemN[s] as
 * regular files, each with an extended attribute "user.vnvdimm" that says what the kernel's
 * node would be:
 *
 *     "<c|b> <major>:<minor> <name> <align> <socket>"
 *
 * Trust. This library runs inside every process with-vnvdimm starts, often as root, so it
 * believes nothing a file says about itself. with-vnvdimm hands it one mount's identity,
 * VNVDIMM_MOUNT_DEV="<major>:<minor>" (the st_dev of MNT/dev); without it the library does
 * nothing at all. That mount must be vnvdimm's (fuse.vnvdimm in /proc/self/mountinfo) and made
 * by root or by this process's user (FUSE's user_id=), as with-vnvdimm requires. A file is an
 * emulated node only if it is a regular file on that very mount (fstat's st_dev, and fstatfs's
 * f_type is FUSE's): the environment can narrow what is trusted, never widen it, and a forged
 * attribute anywhere else is ignored. The socket is
 * the one that mount's daemon names, and its peer must be root or the mount's owner
 * (SO_PEERCRED). For those files, and only those:
 *
 *  - the stat family reports a character or block device with that major:minor (a file that
 *    is a device node for real, e.g. a loop device bound over /dev/pmemN, is left alone);
 *  - ioctl() is forwarded to the daemon with the descriptor itself (SCM_RIGHTS: the daemon
 *    reads the node and the access mode from it). This library sizes the argument as the
 *    kernel does (_IOC_SIZE, the block ioctls' types, __nd_ioctl()'s envelope walk,
 *    cxl_query_cmd()'s n_commands) and sends that much of it, no more. CXL_MEM_SEND_COMMAND
 *    on /dev/cxl/memN names two more buffers, in.payload (in.size bytes) and out.payload
 *    (out.size bytes): they are regions 1 and 2 of the request, placed and sized from one
 *    read of the struct, which is the copy the daemon gets. The daemon validates as the
 *    kernel does and may then fetch a readable region once and store into a writable one
 *    (the argument included) once, each by region index and offset, inside the region (else
 *    EFAULT, connection dropped). Copies go through process_vm_readv/writev, so a bad
 *    pointer is EFAULT as copy_from_user() makes it. An ioctl on a /dev/cxl/memN that has
 *    left the mount's tree since it was opened (its memdev unregistered) is ENXIO, as
 *    cxl_memdev_ioctl() answers it. One deadline bounds the whole exchange (EIO and a line on
 *    stderr when it passes). No malloc and no stdio on that path: ioctl() is
 *    async-signal-safe in the kernel, and so it is here;
 *  - mmap() of a device-dax file is refused where device-dax's check_vma() refuses (EINVAL);
 *  - where /sys is vnvdimm's, answers libkmod's module loads and removals (init_module,
 *    finit_module, delete_module) from the emulated platform (see the end of this file).
 *
 * Statically linked programs and raw syscall()s bypass all of this.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h> /* snprintf and the module list, off the ioctl path (kernel modules) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#if __SIZEOF_LONG__ != 8 || __SIZEOF_POINTER__ != 8
#error "vnvdimm's preload library is 64-bit only: its *64 hooks rely on struct stat64 being struct stat"
#endif
_Static_assert(sizeof(struct stat) == sizeof(struct stat64), "struct stat64 differs from struct stat");
_Static_assert(sizeof(off_t) == sizeof(off64_t), "off64_t differs from off_t");

#define XATTR_NAME "user.vnvdimm"
#define FUSE_MAGIC 0x65735546 /* FUSE_SUPER_MAGIC */
#define WIRE_MAGIC 0x564e5644u /* "VNVD" */
#define WIRE_VERSION 3u
#define OP_WRITE 2u
#define OP_DONE 3u
#define OP_READ 4u
#define REGION_READ 1u  /* the daemon may fetch the region's bytes once (OP_READ) */
#define REGION_WRITE 2u /* the daemon may store into the region once (OP_WRITE) */
#define MAX_REGIONS 3   /* the argument, and the two payloads of CXL_MEM_SEND_COMMAND */
#define MAX_PUSH ((4u << 20) + ND_CMD_MAX_ENVELOPE) /* ND_IOCTL_MAX_BUFLEN and an envelope past it */
#define DEFAULT_TIMEOUT_MS 60000
#define CHUNK 16384 /* the stack buffer copies go through */

struct node {
	char type; /* 'c' or 'b' */
	unsigned int major, minor;
	char name[64];
	unsigned long long align;
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

/* ------------------------------------------------------------------ setup (at load time) */

static int (*real_fstatat)(int, const char *, struct stat *, int);
static int (*real_fstat)(int, struct stat *);
static int (*real_statx)(int, const char *, int, unsigned int, struct statx *);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static long (*real_syscall)(long, ...);
static int (*real_madvise)(void *, size_t, int);

static int trusted;       /* VNVDIMM_MOUNT_DEV named a mount */
static dev_t trusted_dev; /* its st_dev */
static int fuse_checked;  /* fstatfs said the mount is FUSE (or trusted was dropped) */
static int owner_known;
static uid_t mount_owner; /* FUSE's user_id= of that mount, as /proc/self/mountinfo shows it */
static int timeout_ms = DEFAULT_TIMEOUT_MS;

/* A decimal number that is all of [s, end) (or up to NUL if end is NULL), at most max. */
static int parse_uint(const char *s, const char *end, unsigned long long max, unsigned long long *out)
{
	unsigned long long v = 0;

	if (s == end || !*s)
		return 0;
	for (; end ? s < end : *s != '\0'; s++) {
		if (*s < '0' || *s > '9' || v > (max - (unsigned)(*s - '0')) / 10)
			return 0;
		v = v * 10 + (unsigned)(*s - '0');
	}
	*out = v;
	return 1;
}

/* "MAJOR:MINOR" and nothing else. */
static int parse_dev(const char *s, const char *end, dev_t *dev)
{
	const char *colon = memchr(s, ':', (size_t)(end - s));
	unsigned long long major, minor;

	if (!colon || !parse_uint(s, colon, 0xfffff, &major) || !parse_uint(colon + 1, end, 0xfffff, &minor))
		return 0;
	*dev = makedev(major, minor);
	return 1;
}

/* Our effective uid as the parent user namespace knows it (/proc/self/uid_map): FUSE lists
 * its mount's owner (user_id=) as the namespace that mounted it knows them, while a rootless
 * with-vnvdimm runs its command as root in a user namespace of its own. -1 if unmapped. */
static long long euid_outside(void)
{
	char buf[1024], *line = buf, *nl;
	unsigned long long inside, outside, count;
	uid_t me = geteuid();
	ssize_t n;
	int fd = open("/proc/self/uid_map", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return me;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return me;
	buf[n] = '\0';
	for (; (nl = strchr(line, '\n')); line = nl + 1) {
		char *a, *b, *c;

		*nl = '\0';
		a = line + strspn(line, " ");
		b = a + strcspn(a, " ");
		c = b + strspn(b, " ");
		b = c + strcspn(c, " ");
		if (!parse_uint(a, a + strcspn(a, " "), UINT_MAX, &inside) || !parse_uint(c, b, UINT_MAX, &outside))
			continue;
		b += strspn(b, " ");
		if (!parse_uint(b, NULL, UINT_MAX, &count))
			continue;
		if (me >= inside && me - inside < count)
			return (long long)(outside + (me - inside));
	}
	return -1;
}

/* The mount as the kernel lists it: it must be vnvdimm's (fuse.vnvdimm), made (FUSE's
 * user_id=, in the super block's options) by root or by this process's user, as with-vnvdimm
 * requires; else, or if it is not listed, nothing is trusted: a FUSE file system of another
 * user's would choose what this process (often root's) sees as device nodes and whom its
 * ioctls go to. */
static void read_mountinfo(void)
{
	static const char fstype[] = " - fuse.vnvdimm ";
	static char buf[16384];
	size_t have = 0;
	int fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);

	trusted = 0; /* until the mount is seen */
	if (fd < 0)
		return;
	for (;;) {
		ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
		char *line = buf, *nl;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += (size_t)n;
		buf[have] = '\0';
		while ((nl = strchr(line, '\n'))) {
			/* "ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS] - FSTYPE SOURCE SUPEROPTIONS" */
			char *devfield = strchr(line, ' '), *end, *sep, *opt;
			dev_t dev;
			unsigned long long uid;

			*nl = '\0';
			devfield = devfield ? strchr(devfield + 1, ' ') : NULL;
			end = devfield ? strchr(devfield + 1, ' ') : NULL;
			/* the fields before " - " escape their spaces: the first one is the separator */
			sep = strstr(line, " - ");
			/* SUPEROPTIONS follow FSTYPE and SOURCE (escaped: no space in it either) */
			opt = sep && strncmp(sep, fstype, sizeof(fstype) - 1) == 0 ? strchr(sep + sizeof(fstype) - 1, ' ') : NULL;
			opt = opt ? strstr(opt, ",user_id=") : NULL;
			if (end && parse_dev(devfield + 1, end, &dev) && dev == trusted_dev) {
				if (opt) {
					opt += strlen(",user_id=");
					end = opt + strcspn(opt, ", ");
				}
				if (opt && parse_uint(opt, end, UINT_MAX, &uid) &&
				    (uid == 0 || uid == geteuid() || (long long)uid == euid_outside())) {
					mount_owner = (uid_t)uid;
					owner_known = 1;
					trusted = 1;
				}
				close(fd);
				return;
			}
			line = nl + 1;
		}
		have -= (size_t)(line - buf);
		memmove(buf, line, have);
		if (have == sizeof(buf) - 1)
			have = 0; /* a line longer than the buffer: not the one we look for */
	}
	close(fd);
}

__attribute__((constructor)) static void vnvdimm_preload_init(void)
{
	const char *dev = getenv("VNVDIMM_MOUNT_DEV"), *timeout = getenv("VNVDIMM_IOCTL_TIMEOUT_MS");
	unsigned long long ms;

	real_fstatat = (int (*)(int, const char *, struct stat *, int))dlsym(RTLD_NEXT, "fstatat");
	real_fstat = (int (*)(int, struct stat *))dlsym(RTLD_NEXT, "fstat");
	real_statx = (int (*)(int, const char *, int, unsigned int, struct statx *))dlsym(RTLD_NEXT, "statx");
	real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
	real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
	real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
	real_madvise = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
	if (timeout && parse_uint(timeout, NULL, 3600000, &ms) && ms > 0)
		timeout_ms = (int)ms;
	if (dev && parse_dev(dev, dev + strlen(dev), &trusted_dev)) {
		trusted = 1;
		read_mountinfo();
	}
}

/* The C library's functions, or the system call where one could not be found. */
static int sys_fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	return real_fstatat ? real_fstatat(dirfd, path, st, flags) : (int)syscall(SYS_newfstatat, dirfd, path, st, flags);
}

static int sys_fstat(int fd, struct stat *st)
{
	return real_fstat ? real_fstat(fd, st) : (int)syscall(SYS_fstat, fd, st);
}

static int sys_statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
	return real_statx ? real_statx(dirfd, path, flags, mask, stx)
			  : (int)syscall(SYS_statx, dirfd, path, flags, mask, stx);
}

static int sys_ioctl(int fd, unsigned long request, void *arg)
{
	return real_ioctl ? real_ioctl(fd, request, arg) : (int)syscall(SYS_ioctl, fd, request, arg);
}

static void *sys_mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	return real_mmap ? real_mmap(addr, length, prot, flags, fd, offset)
			 : (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
}

/* A line on stderr, without stdio. */
static void complain(const char *what)
{
	static const char prefix[] = "vnvdimm preload: ";
	struct iovec iov[3] = { { (void *)prefix, sizeof(prefix) - 1 }, { (void *)what, strlen(what) }, { "\n", 1 } };
	int saved = errno;

	if (writev(STDERR_FILENO, iov, 3) < 0) {
		/* nowhere to say it: the ioctl's errno says enough */
	}
	errno = saved;
}

/* ------------------------------------------------------------------ which files are ours */

/* A word of [A-Za-z0-9._-] ending at a space (or at end when last); its end. */
static const char *token(const char *s, const char *end, int last)
{
	const char *p = s;

	while (p < end && *p != ' ')
		p++;
	if (p == s || (!last && p == end) || (last && p != end))
		return NULL;
	return p;
}

/* The attribute, all of it: anything malformed or trailing makes the file not ours. */
static int parse_node(const char *buf, size_t n, struct node *node)
{
	const char *end = buf + n, *p = buf, *q, *colon;
	unsigned long long major, minor, align;

	memset(node, 0, sizeof(*node));
	if (n < 2 || (buf[0] != 'c' && buf[0] != 'b') || buf[1] != ' ')
		return 0;
	node->type = buf[0];
	p = buf + 2;
	if (!(q = token(p, end, 0)) || !(colon = memchr(p, ':', (size_t)(q - p))) ||
	    !parse_uint(p, colon, 0xfff, &major) || !parse_uint(colon + 1, q, 0xfffff, &minor))
		return 0;
	p = q + 1;
	if (!(q = token(p, end, 0)) || q - p >= (ptrdiff_t)sizeof(node->name))
		return 0;
	for (const char *c = p; c < q; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '.'))
			return 0;
	memcpy(node->name, p, (size_t)(q - p));
	p = q + 1;
	if (!(q = token(p, end, 0)) || !parse_uint(p, q, ULLONG_MAX, &align))
		return 0;
	p = q + 1;
	if (!(q = token(p, end, 1)) || *p != '/' || q - p >= (ptrdiff_t)sizeof(node->socket))
		return 0;
	for (const char *c = p; c < q; c++)
		if ((unsigned char)*c < 0x21 || (unsigned char)*c == 0x7f)
			return 0;
	memcpy(node->socket, p, (size_t)(q - p));
	node->major = (unsigned int)major;
	node->minor = (unsigned int)minor;
	node->align = align;
	return 1;
}

/* "/proc/self/fd/N": the attribute of whatever fd is, O_PATH descriptors included. */
static void proc_fd_path(int fd, char out[32])
{
	static const char prefix[] = "/proc/self/fd/";
	char digits[12];
	int n = 0;
	unsigned int v = (unsigned int)fd;

	do
		digits[n++] = (char)('0' + v % 10);
	while ((v /= 10) && n < (int)sizeof(digits));
	memcpy(out, prefix, sizeof(prefix) - 1);
	for (int i = 0; i < n; i++)
		out[sizeof(prefix) - 1 + i] = digits[n - 1 - i];
	out[sizeof(prefix) - 1 + n] = '\0';
}

/* Could st be one of ours? (cheap: no system call) */
static int on_mount(const struct stat *st)
{
	return trusted && S_ISREG(st->st_mode) && st->st_dev == trusted_dev;
}

/* The trusted mount is FUSE's, fd being a file on it. FUSE forwards every statfs to the
 * daemon: ask once. The answer holds while the super block lives, and with-vnvdimm's
 * namespace pins it (its /dev is a bind of the mount), so the device number cannot pass to
 * another file system under us. */
static int mount_is_fuse(int fd)
{
	struct statfs fs;

	if (!fuse_checked) {
		if (fstatfs(fd, &fs) != 0)
			return 0;
		if (fs.f_type != FUSE_MAGIC)
			trusted = 0;
		fuse_checked = 1;
	}
	return trusted;
}

/* fd is an emulated node: a regular file on the trusted FUSE mount with a well-formed
 * attribute; st is its stat. errno is left as it was. */
static int node_of_fd(int fd, struct stat *st, struct node *node)
{
	char path[32], buf[256];
	int saved = errno, ok = 0;
	ssize_t n;

	if (!trusted || fd < 0 || sys_fstat(fd, st) != 0 || !on_mount(st))
		goto out;
	if (mount_is_fuse(fd)) {
		proc_fd_path(fd, path);
		n = getxattr(path, XATTR_NAME, buf, sizeof(buf));
		ok = n > 0 && parse_node(buf, (size_t)n, node);
	}
out:
	errno = saved;
	return ok;
}

/* One O_PATH descriptor for (dirfd, path) as a stat call resolves it: what we report comes
 * from it alone, so a rename between two lookups cannot pair one file's stat with another's
 * attribute. -1 if there is none; *opened says whether to close it. */
static int pin(int dirfd, const char *path, int flags, int *opened)
{
	int saved = errno, fd;

	*opened = 0;
	if (!path || !*path)
		return (flags & AT_EMPTY_PATH) && dirfd != AT_FDCWD ? dirfd : -1;
	fd = openat(dirfd, path, O_PATH | O_CLOEXEC | ((flags & AT_SYMLINK_NOFOLLOW) ? O_NOFOLLOW : 0));
	errno = saved;
	*opened = fd >= 0;
	return fd;
}

static void unpin(int fd, int opened)
{
	int saved = errno;

	if (opened)
		close(fd);
	errno = saved;
}

/* ------------------------------------------------------------------ the stat family */

static mode_t node_mode(const struct node *node, mode_t mode)
{
	return (mode & 07777) | (node->type == 'c' ? S_IFCHR : S_IFBLK);
}

static void fix_stat(struct stat *st, const struct node *node)
{
	st->st_mode = node_mode(node, st->st_mode);
	st->st_rdev = makedev(node->major, node->minor);
	st->st_size = 0;
	st->st_blocks = 0;
}

static int stat_at(int dirfd, const char *path, struct stat *st, int flags)
{
	int rc = sys_fstatat(dirfd, path, st, flags), opened, fd;
	struct stat again;
	struct node node;

	if (rc == 0 && on_mount(st) && (fd = pin(dirfd, path, flags, &opened)) >= 0) {
		if (node_of_fd(fd, &again, &node)) {
			*st = again;
			fix_stat(st, &node);
		}
		unpin(fd, opened);
	}
	return rc;
}

static int stat_fd(int fd, struct stat *st)
{
	int rc = sys_fstat(fd, st);
	struct stat again;
	struct node node;

	if (rc == 0 && on_mount(st) && node_of_fd(fd, &again, &node)) {
		*st = again;
		fix_stat(st, &node);
	}
	return rc;
}

int stat(const char *path, struct stat *st) { return stat_at(AT_FDCWD, path, st, 0); }
int stat64(const char *path, struct stat64 *st) { return stat_at(AT_FDCWD, path, (struct stat *)st, 0); }
int lstat(const char *path, struct stat *st) { return stat_at(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW); }
int lstat64(const char *path, struct stat64 *st)
{
	return stat_at(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}
int fstat(int fd, struct stat *st) { return stat_fd(fd, st); }
int fstat64(int fd, struct stat64 *st) { return stat_fd(fd, (struct stat *)st); }
int fstatat(int dirfd, const char *path, struct stat *st, int flags) { return stat_at(dirfd, path, st, flags); }
int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return stat_at(dirfd, path, (struct stat *)st, flags);
}

/* Binaries built against glibc < 2.33 call these (64-bit: one struct layout for every version). */
int __xstat(int ver, const char *path, struct stat *st) { (void)ver; return stat_at(AT_FDCWD, path, st, 0); }
int __xstat64(int ver, const char *path, struct stat64 *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, (struct stat *)st, 0);
}
int __lxstat(int ver, const char *path, struct stat *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}
int __lxstat64(int ver, const char *path, struct stat64 *st)
{
	(void)ver;
	return stat_at(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}
int __fxstat(int ver, int fd, struct stat *st) { (void)ver; return stat_fd(fd, st); }
int __fxstat64(int ver, int fd, struct stat64 *st) { (void)ver; return stat_fd(fd, (struct stat *)st); }
int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	(void)ver;
	return stat_at(dirfd, path, st, flags);
}
int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	(void)ver;
	return stat_at(dirfd, path, (struct stat *)st, flags);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
	int rc = sys_statx(dirfd, path, flags, mask, stx), opened, fd;
	struct stat st = { 0 };
	struct node node;

	if (rc != 0 || !(stx->stx_mask & STATX_TYPE))
		return rc;
	st.st_mode = stx->stx_mode;
	st.st_dev = makedev(stx->stx_dev_major, stx->stx_dev_minor);
	if (!on_mount(&st) || (fd = pin(dirfd, path, flags, &opened)) < 0)
		return rc;
	if (node_of_fd(fd, &st, &node) &&
	    sys_statx(fd, "", AT_EMPTY_PATH | (flags & AT_STATX_SYNC_TYPE), mask, stx) == 0) {
		stx->stx_mode = node_mode(&node, stx->stx_mode);
		stx->stx_rdev_major = node.major;
		stx->stx_rdev_minor = node.minor;
		stx->stx_size = 0;
		stx->stx_blocks = 0;
	}
	unpin(fd, opened);
	return rc;
}

/* ------------------------------------------------------------------ how much of arg an ioctl may touch */

/* Copy between our own memory and the caller's without trusting the pointer: 0 or EFAULT. */
static uint32_t user_copy(char *local, const char *user, size_t n, int to_user)
{
	struct iovec l = { local, n }, r = { (void *)user, n };
	ssize_t done = to_user ? process_vm_writev(getpid(), &l, 1, &r, 1, 0)
			       : process_vm_readv(getpid(), &l, 1, &r, 1, 0);

	return done == (ssize_t)n ? 0 : EFAULT;
}

#define ND_CMD_MAX_ENVELOPE 256
#define ND_IOCTL_MAX_BUFLEN (4u << 20)
#define ND_CMD_CALL 10
#define VAR UINT32_MAX /* a size that comes from an earlier field */

/* struct nd_cmd_desc of the kernel's core.c: field sizes, in then out, for the bus and a DIMM. */
struct desc {
	unsigned char in_num, out_num;
	uint32_t in[5], out[4];
};

static const struct desc bus_descs[ND_CMD_CALL + 1] = {
	[1] = { 2, 4, { 8, 8 }, { 4, 4, 4, 4 } },		 /* ARS_CAP */
	[2] = { 5, 2, { 8, 8, 2, 1, 5 }, { 4, 4 } },		 /* ARS_START */
	[3] = { 0, 3, { 0 }, { 4, 4, VAR } },			 /* ARS_STATUS */
	[4] = { 2, 3, { 8, 8 }, { 4, 4, 8 } },			 /* CLEAR_ERROR */
	[ND_CMD_CALL] = { 2, 1, { 64, VAR }, { VAR } },
};

static const struct desc dimm_descs[ND_CMD_CALL + 1] = {
	[1] = { 0, 2, { 0 }, { 4, 128 } },			 /* SMART */
	[2] = { 0, 2, { 0 }, { 4, 8 } },			 /* SMART_THRESHOLD */
	[3] = { 0, 2, { 0 }, { 4, 4 } },			 /* DIMM_FLAGS */
	[4] = { 0, 3, { 0 }, { 4, 4, 4 } },			 /* GET_CONFIG_SIZE */
	[5] = { 2, 2, { 4, 4 }, { 4, VAR } },			 /* GET_CONFIG_DATA */
	[6] = { 3, 1, { 4, 4, VAR }, { 4 } },			 /* SET_CONFIG_DATA */
	[9] = { 3, 3, { 4, 4, VAR }, { 4, 4, VAR } },		 /* VENDOR */
	[ND_CMD_CALL] = { 2, 1, { 64, VAR }, { VAR } },
};

static uint32_t u32_at(const unsigned char *env, unsigned int at)
{
	uint32_t v;

	memcpy(&v, env + at, sizeof(v));
	return v;
}

/* nd_cmd_in_size() / nd_cmd_out_size() for __nd_ioctl()'s walk (remainder 0). */
static uint32_t field_size(int dimm, unsigned int cmd, const struct desc *d, int out, int i,
			   const unsigned char *in_env, const unsigned char *out_env)
{
	uint32_t size = out ? d->out[i] : d->in[i], length;

	if (size != VAR)
		return size;
	if (!out && dimm && (cmd == 6 || cmd == 9) && i == 2)
		return u32_at(in_env, 4);
	if (out && dimm && cmd == 5 && i == 1)
		return u32_at(in_env, 4);
	if (out && dimm && cmd == 9 && i == 2)
		return u32_at(out_env, 4);
	if (out && !dimm && cmd == 3 && i == 2) {
		length = u32_at(out_env, 4);
		return length < 4 ? 0 : length == 4 ? 0 : length - 8;
	}
	if (cmd == ND_CMD_CALL)
		return u32_at(in_env, out ? 20 : 16);
	return VAR;
}

/* The bytes of arg __nd_ioctl() may touch: every envelope copy, then the whole buffer when its
 * size passes the kernel's maximum. The envelope is read here as the kernel reads it (u32
 * arithmetic included); bytes we cannot read read as zero: the daemon's copy of them fails. */
static uint64_t nd_window(int dimm, unsigned int cmd, const char *arg)
{
	unsigned char in_env[ND_CMD_MAX_ENVELOPE] = { 0 }, out_env[ND_CMD_MAX_ENVELOPE] = { 0 };
	const struct desc *d = cmd <= ND_CMD_CALL ? &(dimm ? dimm_descs : bus_descs)[cmd] : NULL;
	uint64_t window = cmd == ND_CMD_CALL ? 64 : 0, buf_len;
	uint32_t in_len = 0, out_len = 0, size, copy;

	if (!d || d->in_num + d->out_num == 0)
		return window;
	for (int i = 0; i < d->in_num; i++) {
		if ((size = field_size(dimm, cmd, d, 0, i, in_env, out_env)) == VAR)
			return window;
		copy = in_len < ND_CMD_MAX_ENVELOPE ? (ND_CMD_MAX_ENVELOPE - in_len < size ? ND_CMD_MAX_ENVELOPE - in_len : size) : 0;
		if (copy) {
			user_copy((char *)in_env + in_len, arg + in_len, copy, 0);
			if ((uint64_t)in_len + copy > window)
				window = (uint64_t)in_len + copy;
		}
		in_len += size;
	}
	for (int i = 0; i < d->out_num; i++) {
		if ((size = field_size(dimm, cmd, d, 1, i, in_env, out_env)) == VAR)
			return window;
		copy = out_len < ND_CMD_MAX_ENVELOPE ? (ND_CMD_MAX_ENVELOPE - out_len < size ? ND_CMD_MAX_ENVELOPE - out_len : size) : 0;
		if (copy) {
			user_copy((char *)out_env + out_len, arg + (uint64_t)in_len + out_len, copy, 0);
			if ((uint64_t)in_len + out_len + copy > window)
				window = (uint64_t)in_len + out_len + copy;
		}
		out_len += size;
	}
	buf_len = (uint64_t)in_len + out_len;
	return buf_len <= ND_IOCTL_MAX_BUFLEN && buf_len > window ? buf_len : window;
}

/* What the block ioctls copy (block/ioctl.c): their numbers say nothing (_IO) or too much. */
static uint64_t block_window(unsigned long request)
{
	switch (request & 0xffffffffu) {
	case 0x125e: /* BLKROGET: int */
	case 0x1268: /* BLKSSZGET: int */
	case 0x127b: /* BLKPBSZGET: unsigned int */
		return 4;
	case 0x1260: /* BLKGETSIZE: unsigned long */
		return 8;
	default:
		return _IOC_SIZE(request);
	}
}

/*
 * /dev/cxl/memN (include/uapi/linux/cxl_mem.h). CXL_MEM_QUERY_COMMANDS writes the count alone
 * when n_commands is 0, else min(n_commands, CXL_MEM_COMMAND_ID_MAX) entries after its 8-byte
 * header: cxl_query_cmd() lists at most the whole of the kernel's cxl_mem_commands[]. The
 * struct of CXL_MEM_SEND_COMMAND carries two more buffers (see forward_ioctl()).
 */
#define CXL_MEM_QUERY_COMMANDS 0x8008ce01u /* _IOR(0xCE, 1, struct cxl_mem_query_commands) */
#define CXL_MEM_SEND_COMMAND 0xc030ce02u   /* _IOWR(0xCE, 2, struct cxl_send_command) */
#define CXL_MEM_COMMAND_ID_MAX 21u	   /* ARRAY_SIZE(cxl_mem_commands) */
#define CXL_QUERY_HEADER 8u		   /* struct cxl_mem_query_commands without commands[] */
#define CXL_COMMAND_INFO 16u		   /* struct cxl_command_info */
#define CXL_SEND_SIZE 48u		   /* struct cxl_send_command */

static int is_cxl_memdev(const struct node *node)
{
	return node->type == 'c' && strncmp(node->name, "mem", 3) == 0 && node->name[3] >= '0' && node->name[3] <= '9';
}

static uint64_t cxl_query_window(const char *arg)
{
	uint32_t n_commands;

	if (user_copy((char *)&n_commands, arg, sizeof(n_commands), 0))
		return CXL_QUERY_HEADER; /* unreadable: the daemon's get_user() of it faults */
	if (n_commands > CXL_MEM_COMMAND_ID_MAX)
		n_commands = CXL_MEM_COMMAND_ID_MAX;
	return CXL_QUERY_HEADER + (uint64_t)n_commands * CXL_COMMAND_INFO;
}

static uint64_t arg_window(const struct node *node, unsigned long request, const char *arg)
{
	if (is_cxl_memdev(node) && (request & 0xffffffffu) == CXL_MEM_QUERY_COMMANDS)
		return cxl_query_window(arg);
	if (node->type == 'c' && strncmp(node->name, "ndctl", 5) == 0)
		return nd_window(0, _IOC_NR(request), arg);
	if (node->type == 'c' && strncmp(node->name, "nmem", 4) == 0)
		return nd_window(1, _IOC_NR(request), arg);
	if (node->type == 'b')
		return block_window(request);
	return _IOC_SIZE(request);
}

/* ------------------------------------------------------------------ ioctl forwarding */

struct wire_request {
	uint32_t magic, version, request, regions; /* regions: how many wire_regions follow */
	uint64_t window, readable; /* the argument's size as sized here; how much of it follows */
};

/* A buffer of the caller's besides the argument (region 0), as this library sized it. */
struct wire_region {
	uint64_t size;
	uint32_t access, pad; /* REGION_READ or REGION_WRITE */
};

struct wire_op {
	uint32_t op, region;
	uint64_t offset, length;
};

/* What the daemon may touch: [base, base + size), once each way that access allows. The
 * addresses are this process's own (its ioctl argument and the pointers in it, read once):
 * the daemon names a region by its index and an offset, never by an address. */
struct region {
	uint64_t base, size;
	uint32_t access;
	int reads, writes;
};

enum failure { GONE = 1, TIMEOUT, BROKEN };

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Bound the next blocking send (or receive) on sock by what is left until the deadline.
 * Blocking calls, not poll(): a process in an ioctl looks like one in a send or a receive,
 * as it does in the kernel's, never like one waiting for events. */
static int arm(int sock, int sending, long long deadline)
{
	long long left = deadline - now_ms();
	struct timeval tv;

	if (left <= 0)
		return TIMEOUT;
	tv.tv_sec = left / 1000;
	tv.tv_usec = (left % 1000) * 1000;
	return setsockopt(sock, SOL_SOCKET, sending ? SO_SNDTIMEO : SO_RCVTIMEO, &tv, sizeof(tv)) ? BROKEN : 0;
}

/* All of len bytes through the socket, one way or the other, before the deadline. */
static int transfer(int sock, void *buf, size_t len, int sending, long long deadline)
{
	char *p = buf;

	while (len) {
		ssize_t n;
		int rc = arm(sock, sending, deadline);

		if (rc)
			return rc;
		n = sending ? send(sock, p, len, MSG_NOSIGNAL) : recv(sock, p, len, 0);
		if (n > 0) {
			p += n;
			len -= (size_t)n;
		} else if (n == 0 || errno == ECONNRESET || errno == EPIPE) {
			return GONE;
		} else if (errno != EINTR && errno != EAGAIN) {
			return BROKEN;
		}
	}
	return 0;
}

static int connect_daemon(const struct node *node, long long deadline, int *sock)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct ucred peer;
	socklen_t len = sizeof(peer);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), rc;

	if (s < 0)
		return BROKEN;
	memcpy(addr.sun_path, node->socket, strlen(node->socket)); /* parse_node bounded it */
	/* a unix connect waits for room in the listener's backlog at most SO_SNDTIMEO */
	while (!(rc = arm(s, 1, deadline)) && connect(s, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
		if (errno != EINTR) {
			rc = errno == EAGAIN || errno == EINPROGRESS ? TIMEOUT : GONE;
			break;
		}
	}
	if (rc) {
		close(s);
		return rc;
	}
	if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &peer, &len) ||
	    (peer.uid != 0 && !(owner_known && peer.uid == mount_owner))) {
		complain("the ioctl socket is not served by root or the mount's owner: refused");
		close(s);
		return BROKEN;
	}
	*sock = s;
	return 0;
}

/* How much of [arg, arg + window) reads without a fault, from its start. */
static uint64_t readable_prefix(const char *arg, uint64_t window)
{
	char buf[CHUNK];
	uint64_t done = 0;

	while (done < window) {
		size_t n = window - done < CHUNK ? window - done : CHUNK;
		struct iovec l = { buf, n }, r = { (void *)(arg + done), n };
		ssize_t got = process_vm_readv(getpid(), &l, 1, &r, 1, 0);

		if (got <= 0)
			break;
		done += (uint64_t)got;
		if ((size_t)got < n)
			break;
	}
	return done;
}

/* The request, with the descriptor itself (the daemon reads the node and the open's flags
 * from it), the sizes of the other regions, then the readable part of the argument (of
 * `copy`, when the argument was read already: what the regions were sized from is what the
 * daemon sees): the daemon reads nothing else of ours unless it asks (OP_READ). */
static int send_request(int sock, int fd, unsigned long request, const struct region *regions, int nregions,
			const char *copy, long long deadline)
{
	const char *arg = (const char *)(uintptr_t)regions[0].base;
	uint64_t window = regions[0].size;
	struct wire_request req = { WIRE_MAGIC, WIRE_VERSION, (uint32_t)request, (uint32_t)(nregions - 1), window, 0 };
	struct wire_region extra[MAX_REGIONS - 1];
	struct iovec iov[2] = { { &req, sizeof(req) }, { extra, sizeof(extra[0]) * (size_t)(nregions - 1) } };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = { .msg_iov = iov, .msg_iovlen = 2, .msg_control = control.buf,
			      .msg_controllen = sizeof(control.buf) };
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	char buf[CHUNK];
	uint64_t done;
	ssize_t n;
	size_t head = sizeof(req) + iov[1].iov_len;
	int rc;

	memset(extra, 0, sizeof(extra));
	for (int i = 1; i < nregions; i++) {
		extra[i - 1].size = regions[i].size;
		extra[i - 1].access = regions[i].access;
	}
	req.readable = copy ? window : readable_prefix(arg, window);
	memset(control.buf, 0, sizeof(control.buf));
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
	do {
		if ((rc = arm(sock, 1, deadline)))
			return rc;
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	} while (n < 0 && (errno == EINTR || errno == EAGAIN));
	if (n < 0)
		return errno == ECONNRESET || errno == EPIPE ? GONE : BROKEN;
	if ((size_t)n < sizeof(req) && (rc = transfer(sock, (char *)&req + n, sizeof(req) - (size_t)n, 1, deadline)))
		return rc;
	if ((size_t)n < head) {
		size_t from = (size_t)n > sizeof(req) ? (size_t)n - sizeof(req) : 0;

		if ((rc = transfer(sock, (char *)extra + from, iov[1].iov_len - from, 1, deadline)))
			return rc;
	}
	for (done = 0; done < req.readable; done += CHUNK) {
		size_t len = req.readable - done < CHUNK ? req.readable - done : CHUNK;

		if (copy)
			memcpy(buf, copy + done, len);
		else if (user_copy(buf, arg + done, len, 0))
			return BROKEN; /* unmapped since we looked: what we promised cannot be sent */
		if ((rc = transfer(sock, buf, len, 1, deadline)))
			return rc;
	}
	return 0;
}

/* [start, start + length) of a region, unless it wraps past the end of the address space
 * (access_ok() refuses such a range: EFAULT). */
static int region_span(const struct region *r, const struct wire_op *op, uint64_t *start)
{
	*start = r->base + op->offset;
	return *start >= r->base && *start + op->length >= *start;
}

/* WRITE: the bytes come, then our status (0, or EFAULT where copy_to_user() would fail). */
static int serve_write(int sock, const struct wire_op *op, const struct region *r, long long deadline)
{
	char buf[CHUNK];
	uint64_t start, done;
	uint32_t status = region_span(r, op, &start) ? 0 : EFAULT;
	int rc;

	for (done = 0; done < op->length; done += CHUNK) {
		size_t n = op->length - done < CHUNK ? op->length - done : CHUNK;

		if ((rc = transfer(sock, buf, n, 0, deadline)))
			return rc;
		if (!status)
			status = user_copy(buf, (char *)(uintptr_t)(start + done), n, 1);
	}
	return transfer(sock, &status, sizeof(status), 1, deadline);
}

/* READ: our status (0, or EFAULT where copy_from_user() would fault), then, if 0, the bytes. */
static int serve_read(int sock, const struct wire_op *op, const struct region *r, long long deadline)
{
	char buf[CHUNK];
	uint64_t start, done;
	uint32_t status = 0;
	int rc;

	if (!region_span(r, op, &start) || readable_prefix((const char *)(uintptr_t)start, op->length) < op->length)
		status = EFAULT;
	if ((rc = transfer(sock, &status, sizeof(status), 1, deadline)) || status)
		return rc;
	for (done = 0; done < op->length; done += CHUNK) {
		size_t n = op->length - done < CHUNK ? op->length - done : CHUNK;

		if (user_copy(buf, (const char *)(uintptr_t)(start + done), n, 0))
			return BROKEN; /* unmapped since we looked: what we promised cannot be sent */
		if ((rc = transfer(sock, buf, n, 1, deadline)))
			return rc;
	}
	return 0;
}

/* An op the daemon may ask for: inside one region, the way it allows, once each way (the
 * kernel copies each buffer in once and out once). */
static struct region *allowed(const struct wire_op *op, struct region *regions, int nregions)
{
	struct region *r = op->region < (uint32_t)nregions ? &regions[op->region] : NULL;

	if (!r || op->offset > r->size || op->length > r->size - op->offset)
		return NULL;
	if (op->op == OP_WRITE && (r->access & REGION_WRITE) && !r->writes++)
		return r;
	if (op->op == OP_READ && (r->access & REGION_READ) && !r->reads++)
		return r;
	return NULL;
}

static int forward_ioctl(int fd, const struct node *node, unsigned long request, char *arg)
{
	uint64_t window = arg_window(node, request, arg);
	long long deadline = now_ms() + timeout_ms;
	struct region regions[MAX_REGIONS];
	unsigned char send_cmd[CXL_SEND_SIZE];
	const char *copy = NULL;
	struct wire_op op;
	int sock = -1, flags = fcntl(fd, F_GETFL), rc, nregions = 1;

	if (flags < 0)
		return -1;
	if (flags & O_PATH) {
		errno = EBADF; /* as the kernel answers an ioctl on an O_PATH descriptor */
		return -1;
	}
	if (window > MAX_PUSH)
		window = MAX_PUSH; /* an envelope pointing that far: the daemon's read of it faults */
	regions[0] = (struct region){ (uint64_t)(uintptr_t)arg, window, REGION_WRITE, 0, 0 };
	/*
	 * CXL_MEM_SEND_COMMAND: the kernel copies in.size bytes in from in.payload and at most
	 * out.size bytes out to out.payload. Those are regions 1 and 2, sized from one read of the
	 * struct, which is also what the daemon gets. An unreadable struct: no regions (the
	 * daemon's copy_from_user() of it faults).
	 */
	if (is_cxl_memdev(node) && (request & 0xffffffffu) == CXL_MEM_SEND_COMMAND && window == CXL_SEND_SIZE &&
	    user_copy((char *)send_cmd, arg, sizeof(send_cmd), 0) == 0) {
		uint32_t in_size, out_size;
		uint64_t in_payload, out_payload;

		memcpy(&in_size, send_cmd + 16, sizeof(in_size));
		memcpy(&in_payload, send_cmd + 24, sizeof(in_payload));
		memcpy(&out_size, send_cmd + 32, sizeof(out_size));
		memcpy(&out_payload, send_cmd + 40, sizeof(out_payload));
		regions[1] = (struct region){ in_payload, in_size, REGION_READ, 0, 0 };
		regions[2] = (struct region){ out_payload, out_size, REGION_WRITE, 0, 0 };
		nregions = 3;
		copy = (const char *)send_cmd;
	}
	if ((rc = connect_daemon(node, deadline, &sock)) ||
	    (rc = send_request(sock, fd, request, regions, nregions, copy, deadline)))
		goto failed;
	for (;;) {
		struct region *r;

		if ((rc = transfer(sock, &op, sizeof(op), 0, deadline)))
			goto failed;
		if (op.op == OP_DONE) {
			close(sock);
			if (op.offset) { /* the daemon's errno: a real one, or EIO */
				errno = op.offset < 4096 ? (int)op.offset : EIO;
				return -1;
			}
			if (op.length > INT_MAX) {
				errno = EIO;
				return -1;
			}
			return (int)op.length;
		}
		if (!(r = allowed(&op, regions, nregions))) {
			complain("the daemon asked for memory outside the ioctl's buffers: refused");
			close(sock);
			errno = EFAULT;
			return -1;
		}
		if ((rc = op.op == OP_WRITE ? serve_write(sock, &op, r, deadline) : serve_read(sock, &op, r, deadline)))
			goto failed;
	}
failed:
	if (sock >= 0)
		close(sock);
	if (rc == TIMEOUT)
		complain("the daemon did not answer an ioctl in time");
	else if (rc == BROKEN)
		complain("the ioctl channel failed");
	/* GONE: the daemon is not there; as if its device had been removed under the open file */
	errno = rc == GONE ? ENXIO : EIO;
	return -1;
}

/* fd was a memdev's node of the trusted mount (/dev/cxl/memN) whose memdev is gone since it
 * was opened (cxl_test unloaded): the file is no longer in the tree, so it has no attribute
 * left. The kernel's cxl_memdev_ioctl() answers ENXIO for such a file, whatever the command. */
static int vanished_memdev(int fd)
{
	static const char prefix[] = "/dev/cxl/mem";
	char path[32], where[64], attr[256];
	struct statx stx;
	struct stat st = { 0 };
	ssize_t n;
	int saved = errno, gone = 0;

	/* fstat() asks the daemon, which no longer knows the file (ENOENT): the attributes the
	 * kernel cached when it was opened say what it was */
	if (trusted && fd >= 0 &&
	    sys_statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE, &stx) == 0 && (stx.stx_mask & STATX_TYPE)) {
		st.st_mode = stx.stx_mode;
		st.st_dev = makedev(stx.stx_dev_major, stx.stx_dev_minor);
	}
	if (on_mount(&st) && mount_is_fuse(fd)) {
		proc_fd_path(fd, path);
		n = readlink(path, where, sizeof(where) - 1);
		if (n > (ssize_t)(sizeof(prefix) - 1) && memcmp(where, prefix, sizeof(prefix) - 1) == 0 &&
		    getxattr(path, XATTR_NAME, attr, sizeof(attr)) < 0 && errno == ENOENT)
			gone = 1;
	}
	errno = saved;
	return gone;
}

int ioctl(int fd, unsigned long request, ...)
{
	struct stat st;
	struct node node;
	va_list ap;
	char *arg;

	va_start(ap, request);
	arg = va_arg(ap, char *);
	va_end(ap);
	if (node_of_fd(fd, &st, &node))
		return forward_ioctl(fd, &node, request, arg);
	if (vanished_memdev(fd)) {
		errno = ENXIO;
		return -1;
	}
	return sys_ioctl(fd, request, arg);
}

/* ------------------------------------------------------------------ device-dax mmap checks */

static int dax_refuses(int fd, void *addr, size_t length, int flags, off_t offset)
{
	struct stat st;
	struct node node;
	unsigned long long mask;

	if ((flags & MAP_ANONYMOUS) || fd < 0 || !node_of_fd(fd, &st, &node))
		return 0;
	if (node.type != 'c' || strncmp(node.name, "dax", 3) != 0 || node.align == 0)
		return 0;
	if ((flags & MAP_TYPE) == MAP_PRIVATE)
		return 1; /* check_vma(): "attempted private mapping" */
	mask = node.align - 1;
	/* the mapping starts where get_unmapped_area() puts offset on an align boundary */
	return ((unsigned long long)offset & mask) || ((unsigned long long)length & mask) ||
	       ((flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) && ((unsigned long long)(uintptr_t)addr & mask));
}

static int is_device_dax(const struct node *node)
{
	return node->type == 'c' && strncmp(node->name, "dax", 3) == 0 && node->align != 0;
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	struct stat st;
	struct node node;

	if (dax_refuses(fd, addr, length, flags, offset)) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	/*
	 * device-dax supports MAP_SYNC (dax_fops.mmap_supported_flags), which only
	 * MAP_SHARED_VALIDATE may ask for; the file under it (FUSE) supports neither: its
	 * shared mapping is what MAP_SYNC promises here (every store reaches the media file).
	 */
	if (!(flags & MAP_ANONYMOUS) && fd >= 0 && (flags & MAP_TYPE) == MAP_SHARED_VALIDATE &&
	    node_of_fd(fd, &st, &node) && is_device_dax(&node))
		flags = (flags & ~(MAP_TYPE | MAP_SYNC)) | MAP_SHARED;
	return sys_mmap(addr, length, prot, flags, fd, offset);
}

void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off64_t offset)
{
	return mmap(addr, length, prot, flags, fd, offset);
}

/* ------------------------------------------------------------------ kernel modules */

/*
 * libkmod loads a module with finit_module() (through syscall()) or init_module() and removes
 * one with delete_module(): ndctl_test_init() reloads nfit_test so, in the C tests' own
 * process. Where /sys is vnvdimm's, none of that may reach the host's
 * kernel: the platform's own modules (nfit_test) are loaded and removed by the daemon through
 * that file, as the modprobe shim does; the others are what /sys/module shows, loaded for good.
 * Errors are the kernel's: EEXIST for a module already loaded, ENOENT for removing one that is
 * not, EWOULDBLOCK for one that others hold, ENOEXEC for an image the platform cannot load.
 */
#define MODPROBE_CTL "/sys/module/vnvdimm/modprobe"
#define MODULES_LIST "/sys/module/vnvdimm/modules"

static int vnvdimm_sysfs(void)
{
	/* only in a process with-vnvdimm started for a mount (the library trusts nothing else);
	 * /sys/class/vnvdimm is in every vnvdimm tree and in no kernel's; MODPROBE_CTL only on
	 * platforms with a loadable module */
	return trusted && (access("/sys/class/vnvdimm", F_OK) == 0 || access(MODPROBE_CTL, F_OK) == 0);
}

static int module_path(const char *name, const char *leaf, char *path, size_t size)
{
	if (!name[0] || strchr(name, '/') || strlen(name) >= 64)
		return -1;
	snprintf(path, size, "/sys/module/%s%s", name, leaf);
	return 0;
}

static int module_live(const char *name)
{
	char path[128];

	return module_path(name, "/initstate", path, sizeof(path)) == 0 && access(path, F_OK) == 0;
}

static int module_held(const char *name)
{
	char path[128], buf[32] = "";
	ssize_t n;
	int fd;

	if (module_path(name, "/refcnt", path, sizeof(path)) < 0 || (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 && atoi(buf) > 0;
}

static int platform_module(const char *name)
{
	char line[128];
	int found = 0;
	FILE *list = fopen(MODULES_LIST, "re");

	if (!list)
		return 0;
	while (!found && fgets(line, sizeof(line), list)) {
		line[strcspn(line, "\n")] = '\0';
		found = strcmp(line, name) == 0;
	}
	fclose(list);
	return found;
}

static int modprobe_ctl(const char *verb, const char *name)
{
	char cmd[128];
	int fd, len, ok;

	len = snprintf(cmd, sizeof(cmd), "%s %s", verb, name);
	fd = open(MODPROBE_CTL, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ok = write(fd, cmd, (size_t)len) == len;
	close(fd);
	return ok ? 0 : -1;
}

static long fail_with(int err)
{
	errno = err;
	return -1;
}

static long emulated_delete_module(const char *name)
{
	if (!module_live(name))
		return fail_with(ENOENT);
	if (module_held(name))
		return fail_with(EWOULDBLOCK);
	if (!platform_module(name))
		return fail_with(EBUSY);
	return modprobe_ctl("remove", name) == 0 ? 0 : fail_with(EBUSY);
}

static long emulated_finit_module(int fd)
{
	char link[64], path[4096], name[64], *base, *dot;
	ssize_t n;
	size_t i;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, path, sizeof(path) - 1);
	if (n < 0)
		return fail_with(EBADF);
	path[n] = '\0';
	base = strrchr(path, '/');
	base = base ? base + 1 : path;
	if (strlen(base) >= sizeof(name))
		return fail_with(ENOEXEC);
	memcpy(name, base, strlen(base) + 1);
	dot = strstr(name, ".ko");
	if (!dot)
		return fail_with(ENOEXEC);
	*dot = '\0';
	for (i = 0; name[i]; i++)
		if (name[i] == '-')
			name[i] = '_';
	if (module_live(name))
		return fail_with(EEXIST);
	if (!platform_module(name))
		return fail_with(ENOEXEC);
	return modprobe_ctl("load", name) == 0 ? 0 : fail_with(ENOEXEC);
}

/* The C library's syscall(); without it (it always has one) the call is not made. */
static long sys_syscall(long number, long a0, long a1, long a2, long a3, long a4, long a5)
{
	if (!real_syscall)
		return fail_with(ENOSYS);
	return real_syscall(number, a0, a1, a2, a3, a4, a5);
}

int delete_module(const char *name, unsigned int flags)
{
	if (vnvdimm_sysfs())
		return (int)emulated_delete_module(name);
	return (int)sys_syscall(SYS_delete_module, (long)name, (long)flags, 0, 0, 0, 0);
}

int init_module(void *image, unsigned long len, const char *params)
{
	if (vnvdimm_sysfs())
		return (int)fail_with(ENOEXEC); /* a module image: never the host kernel's from here */
	return (int)sys_syscall(SYS_init_module, (long)image, (long)len, (long)params, 0, 0, 0);
}

long syscall(long number, ...)
{
	long a[6];
	va_list ap;
	int i;

	va_start(ap, number);
	for (i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	if ((number == SYS_finit_module || number == SYS_init_module || number == SYS_delete_module) && vnvdimm_sysfs()) {
		if (number == SYS_finit_module)
			return emulated_finit_module((int)a[0]);
		if (number == SYS_delete_module)
			return emulated_delete_module((const char *)a[0]);
		return fail_with(ENOEXEC);
	}
	return sys_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

/* ------------------------------------------------------------------ device-dax poison */

/*
 * madvise(MADV_SOFT_OFFLINE / MADV_HWPOISON) on a device-dax mapping, as the kernel answers
 * them for ZONE_DEVICE pages (mm/madvise.c madvise_inject_error(), mm/memory-failure.c):
 * soft-offlining such a page fails with EIO; poisoning one sends the caller SIGBUS with
 * BUS_MCEERR_AR ("action required") at the address, and the page faults with SIGBUS from then
 * on. Here the poison is this mapping's only (the page is replaced with one that has no
 * backing); other mappings of the device and the device's data are untouched (see
 * docs/limits.md). Other mappings go to the kernel.
 */
#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100 /* linux/mman.h */
#endif
#ifndef MADV_SOFT_OFFLINE
#define MADV_SOFT_OFFLINE 101
#endif

static int node_of_path(const char *path, struct node *node)
{
	struct stat st;
	int opened, fd = pin(AT_FDCWD, path, 0, &opened), ok;

	if (fd < 0)
		return 0;
	ok = node_of_fd(fd, &st, node);
	unpin(fd, opened);
	return ok;
}

static int dax_mapping_of(const void *addr, struct node *node)
{
	char line[4352], path[4096];
	unsigned long start, end, a = (unsigned long)(uintptr_t)addr;
	int found = 0;
	FILE *maps = fopen("/proc/self/maps", "re");

	if (!maps)
		return 0;
	while (!found && fgets(line, sizeof(line), maps)) {
		path[0] = '\0';
		if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095[^\n]", &start, &end, path) < 2)
			continue;
		if (a < start || a >= end)
			continue;
		found = path[0] == '/' && node_of_path(path, node) && is_device_dax(node);
		break;
	}
	fclose(maps);
	return found;
}

static int poison_page(void *page, const struct node *node)
{
	siginfo_t info;
	int fd, lsb = 12;
	void *gone;

	/* a page of an empty file: every access past its end is SIGBUS */
	fd = (int)sys_syscall(SYS_memfd_create, (long)"vnvdimm-hwpoison", 1 /* MFD_CLOEXEC */, 0, 0, 0, 0);
	if (fd < 0)
		return -1;
	gone = sys_mmap(page, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
	close(fd);
	if (gone == MAP_FAILED)
		return -1;
	while ((1ull << (lsb + 1)) <= node->align && lsb < 30)
		lsb++; /* the size the device maps with: what dev_pagemap_mapping_shift() reports */
	memset(&info, 0, sizeof(info));
	info.si_signo = SIGBUS;
	info.si_code = BUS_MCEERR_AR;
	info.si_addr = page;
	info.si_addr_lsb = (short)lsb;
	return (int)sys_syscall(SYS_rt_tgsigqueueinfo, getpid(), sys_syscall(SYS_gettid, 0, 0, 0, 0, 0, 0), SIGBUS,
				(long)&info, 0, 0);
}

static int sys_madvise(void *addr, size_t length, int advice)
{
	return real_madvise ? real_madvise(addr, length, advice) : (int)sys_syscall(SYS_madvise, (long)addr,
										(long)length, advice, 0, 0, 0);
}

int madvise(void *addr, size_t length, int advice)
{
	struct node node;
	char *page;

	if ((advice != MADV_SOFT_OFFLINE && advice != MADV_HWPOISON) || !dax_mapping_of(addr, &node))
		return sys_madvise(addr, length, advice);
	if (geteuid() != 0) /* capable(CAP_SYS_ADMIN) */
		return (int)fail_with(EPERM);
	if (advice == MADV_SOFT_OFFLINE)
		return (int)fail_with(EIO); /* soft_offline_page(): not an online page */
	for (page = (char *)((uintptr_t)addr & ~(uintptr_t)4095); page < (char *)addr + length; page += 4096)
		if (poison_page(page, &node) < 0)
			return -1;
	return 0;
}
