/* Oracle for tests/test_losses_darknet.py: runs Darknet's own forward_yolo_layer (src/yolo_layer.c, CPU) on
 * given head maps and truths and writes l.delta.
 *
 * Built by tests/darknet_oracle.py with `cc` from this file, the [yolo] parsing code cut verbatim out of
 * Darknet's src/parser.c (parse_yolo_mask, get_classes_multipliers, parse_yolo; generated as
 * parse_yolo_extract.c in the build folder) and Darknet's yolo_layer.c, box.c, blas.c, activations.c,
 * utils.c, list.c, option_list.c. Nothing of Darknet is transcribed here: only the symbols of files we do not
 * link are stubbed (they are not reached on this path).
 *
 * usage: harness LAYER.txt INPUT.bin TRUTH.bin DELTA.bin
 *   LAYER.txt: line 1 "batch w h net_w net_h", then the [yolo] block's key=value lines as in the cfg
 *   INPUT.bin: batch * outputs float32 in Darknet's layout [b][anchor][entry][row][col]
 *   TRUTH.bin: batch * max * 6 float32 (x, y, w, h, class, track id), zero-padded (Darknet stops at x == 0)
 *   DELTA.bin: written, same size and layout as INPUT.bin (l.delta after forward_yolo_layer)
 * On the GPU, backward_yolo_layer_gpu scales the delta by delta_normalizer; the CPU backward does not. The
 * harness writes l.delta as forward_yolo_layer leaves it (the test applies delta_normalizer).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "darknet.h"
#include "list.h"
#include "option_list.h"
#include "utils.h"
#include "yolo_layer.h"

#include "parse_yolo_extract.c"

/* network.c is not linked: forward_yolo_layer only asks it for the iteration (for bad-label rejection,
 * which is off in this network). */
int64_t get_current_iteration(network net) { return 0; }
/* data.c is not linked: option_list.c's get_metadata (unused here) refers to it. */
char **get_labels(char *filename) { return 0; }

static float *read_floats(const char *path, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "harness: cannot open %s\n", path); exit(2); }
    float *buf = (float *)xcalloc(n + 1, sizeof(float));
    size_t got = fread(buf, sizeof(float), n + 1, f);
    fclose(f);
    if (got != n) { fprintf(stderr, "harness: %s holds %zu floats, expected %zu\n", path, got, n); exit(2); }
    return buf;
}

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: harness LAYER.txt INPUT.bin TRUTH.bin DELTA.bin\n"); return 2; }
    FILE *f = fopen(argv[1], "r");
    if (!f) { fprintf(stderr, "harness: cannot open %s\n", argv[1]); return 2; }
    int batch, w, h, net_w, net_h;
    if (fscanf(f, "%d %d %d %d %d\n", &batch, &w, &h, &net_w, &net_h) != 5) { fprintf(stderr, "bad header\n"); return 2; }
    list *options = make_list();
    char *line;
    while ((line = fgetl(f)) != 0) {
        strip(line);
        if (line[0] && line[0] != '#' && line[0] != ';' && line[0] != '[') read_option(line, options);
    }
    fclose(f);

    /* inputs must equal l.outputs (parse_yolo checks it): mask length x (classes + 5) x h x w */
    int classes = option_find_int_quiet(options, "classes", 20);
    int num = option_find_int_quiet(options, "num", 1);
    char *mask_str = option_find_str_quiet(options, "mask", 0);
    if (mask_str) { int n = 1; char *c; for (c = mask_str; *c && *c != '#'; ++c) if (*c == ',') ++n; num = n; }

    network net = { 0 };
    int total_bbox = 0, rewritten_bbox = 0;
    float zero = 0;
    net.w = net_w; net.h = net_h; net.batch = batch;
    net.total_bbox = &total_bbox; net.rewritten_bbox = &rewritten_bbox;
    net.delta_rolling_max = net.delta_rolling_avg = net.delta_rolling_std = net.badlabels_reject_threshold = &zero;
    uint64_t seen = 0;
    net.seen = &seen;
    size_params params = { 0 };
    params.batch = batch; params.w = w; params.h = h; params.c = num * (classes + 5);
    params.inputs = w * h * num * (classes + 5); params.train = 1; params.net = net;
    layer l = parse_yolo(options, params);
    l.show_details = 0;  /* its per-batch report does not change the delta */

    float *input = read_floats(argv[2], (size_t)batch * l.outputs);
    float *truth = read_floats(argv[3], (size_t)batch * l.truths);
    network_state state = { 0 };
    state.input = input; state.truth = truth; state.train = 1; state.net = net;
    forward_yolo_layer(l, state);

    FILE *o = fopen(argv[4], "wb");
    if (!o || fwrite(l.delta, sizeof(float), (size_t)batch * l.outputs, o) != (size_t)batch * l.outputs) {
        fprintf(stderr, "harness: cannot write %s\n", argv[4]); return 2;
    }
    fclose(o);
    return 0;
}
