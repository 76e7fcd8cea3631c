// The Python module of vilseg's native CPU operators, vilseg.ops._native: the ViL layer's fused operators
// (vil_layer.cpp, used by vilseg/ops/vil_layer.py) and the chunkwise mLSTM kernel (mlstm_chunkwise.cpp, used by
// vilseg/ops/mlstm.py).
#include <torch/extension.h>

#include <limits>
#include <vector>

namespace py = pybind11;

at::Tensor conv_silu_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t grid_rows, int64_t grid_cols, int64_t row0, int64_t rows);
std::vector<at::Tensor> conv_silu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t grid_rows,
                                           int64_t grid_cols, int64_t row0, int64_t rows,
                                           const c10::optional<at::Tensor>& out, int64_t accumulate_from,
                                           const c10::optional<at::Tensor>& addend);
std::vector<at::Tensor> gated_norm_forward(const at::Tensor& h, const c10::optional<at::Tensor>& norm_weight,
                                           const c10::optional<at::Tensor>& norm_bias, const at::Tensor& skip,
                                           const at::Tensor& xc, const at::Tensor& z, double eps,
                                           const c10::optional<at::Tensor>& out_view);
std::vector<at::Tensor> gated_norm_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& mean,
                                            const at::Tensor& rstd, const c10::optional<at::Tensor>& norm_weight,
                                            const c10::optional<at::Tensor>& norm_bias, const at::Tensor& skip,
                                            const at::Tensor& xc, const at::Tensor& z,
                                            const c10::optional<at::Tensor>& dz_out);
std::vector<at::Tensor> cell_inputs_forward(const at::Tensor& xc, const at::Tensor& xm, const at::Tensor& wq,
                                            const at::Tensor& wk, const at::Tensor& wv,
                                            const c10::optional<at::Tensor>& bq, const c10::optional<at::Tensor>& bk,
                                            const c10::optional<at::Tensor>& bv, const at::Tensor& gate_wc,
                                            const at::Tensor& gate_wm, const at::Tensor& gate_b, int64_t num_heads);
std::vector<at::Tensor> cell_inputs_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                             const at::Tensor& digate, const at::Tensor& dfgate, const at::Tensor& xc,
                                             const at::Tensor& xm, const at::Tensor& wq, const at::Tensor& wk,
                                             const at::Tensor& wv, const at::Tensor& gate_wc,
                                             const at::Tensor& gate_wm, const c10::optional<at::Tensor>& dxc_addend);
std::vector<at::Tensor> fold_gate_weights(const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                                          const c10::optional<at::Tensor>& bq, const c10::optional<at::Tensor>& bk,
                                          const c10::optional<at::Tensor>& bv, const at::Tensor& gate_w,
                                          const at::Tensor& gate_b);
std::vector<at::Tensor> fold_gate_weights_backward(const at::Tensor& d_wc, const at::Tensor& d_wm,
                                                   const at::Tensor& d_b, const at::Tensor& wq, const at::Tensor& wk,
                                                   const at::Tensor& wv, const c10::optional<at::Tensor>& bq,
                                                   const c10::optional<at::Tensor>& bk,
                                                   const c10::optional<at::Tensor>& bv, const at::Tensor& gate_w);
std::vector<at::Tensor> chunkwise_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& ig, const at::Tensor& fg,
                                          const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& n0,
                                          const at::Tensor& m0, double eps, bool intra);
std::vector<at::Tensor> chunkwise_backward(const c10::optional<at::Tensor>& dh,
                                           const c10::optional<at::Tensor>& dc_final,
                                           const c10::optional<at::Tensor>& dn_final, const at::Tensor& q,
                                           const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& ig, const at::Tensor& fg,
                                           const at::Tensor& c_in, const at::Tensor& n_in, const at::Tensor& m_in,
                                           const at::Tensor& m_final, const at::Tensor& h, const at::Tensor& denom,
                                           const at::Tensor& normaliser, const at::Tensor& m, bool initial,
                                           const c10::optional<at::Tensor>& scores);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_silu_forward", &conv_silu_forward);
  // the optional outputs last, defaulted: the registered operators (vil_layer.py) call without them
  m.def("conv_silu_backward", &conv_silu_backward, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("grid_rows"), py::arg("grid_cols"), py::arg("row0"), py::arg("rows"), py::arg("out") = py::none(),
        py::arg("accumulate_from") = std::numeric_limits<int64_t>::max(), py::arg("addend") = py::none());
  m.def("gated_norm_forward", &gated_norm_forward, py::arg("h"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("skip"), py::arg("xc"), py::arg("z"), py::arg("eps"), py::arg("out") = py::none());
  m.def("gated_norm_backward", &gated_norm_backward, py::arg("grad"), py::arg("h"), py::arg("mean"), py::arg("rstd"),
        py::arg("norm_weight"), py::arg("norm_bias"), py::arg("skip"), py::arg("xc"), py::arg("z"),
        py::arg("dz_out") = py::none());
  m.def("cell_inputs_forward", &cell_inputs_forward);
  m.def("cell_inputs_backward", &cell_inputs_backward, py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("digate"), py::arg("dfgate"), py::arg("xc"), py::arg("xm"), py::arg("wq"), py::arg("wk"),
        py::arg("wv"), py::arg("gate_wc"), py::arg("gate_wm"), py::arg("dxc_addend") = py::none());
  m.def("fold_gate_weights", &fold_gate_weights);
  m.def("fold_gate_weights_backward", &fold_gate_weights_backward);
  m.def("chunkwise_forward", &chunkwise_forward);
  m.def("chunkwise_backward", &chunkwise_backward, py::arg("dh"), py::arg("dc_final"), py::arg("dn_final"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("ig"), py::arg("fg"), py::arg("c_in"), py::arg("n_in"),
        py::arg("m_in"), py::arg("m_final"), py::arg("h"), py::arg("denom"), py::arg("normaliser"), py::arg("m"),
        py::arg("initial"), py::arg("scores") = py::none());
}
