"""The Symbol API walk-through (variables, infer_shape/infer_type, bind, JSON, Module) with the
fused ops in the graph."""
import mxnet as mx
import numpy as np

import fusedres


def build():
    data = mx.sym.var("data")
    # Declares c1_weight, c1_bias, c1_gamma, c1_beta and the auxiliary states
    # c1_running_mean/var with their initializers, so Module.fit can set them up. (Plain
    # mx.sym.Custom(data, op_type="fusedres_conv1d_bn_relu", ...) creates the same variables,
    # but then the running statistics need aux_params= or Variables with init=.)
    y = fusedres.conv1d_bn_relu_symbol(data, num_filter=8, kernel=3, pad=1, name="c1")
    z = fusedres.conv1d_bn_relu_symbol(y, num_filter=8, kernel=3, pad=1, name="c2")
    z = fusedres.add_relu(z, y, name="join")
    z = mx.sym.FullyConnected(z, num_hidden=2, name="fc")
    return mx.sym.SoftmaxOutput(z, name="softmax")


def main(seed=0):
    mx.random.seed(seed)  # initial weights and data: the run is the same every time
    net = build()
    print("arguments:", net.list_arguments())
    print("auxiliary states:", net.list_auxiliary_states())
    arg_shapes, out_shapes, aux_shapes = net.infer_shape(data=(4, 3, 20))
    print("shapes from the data shape alone:", dict(zip(net.list_arguments(), arg_shapes)))
    print("types:", net.infer_type(data=np.float32)[1])
    again = mx.sym.load_json(net.tojson())
    assert again.list_arguments() == net.list_arguments()

    x = mx.nd.random.normal(shape=(32, 3, 20))
    label = (x.mean(axis=(1, 2)) > 0)
    it = mx.io.NDArrayIter(x, label, batch_size=8, label_name="softmax_label")
    mod = mx.mod.Module(net, context=mx.cpu())
    mod.fit(it, num_epoch=3, optimizer="adam", optimizer_params={"learning_rate": 0.01},
            eval_metric="acc", initializer=mx.init.Xavier())
    score = mod.score(it, "acc")
    print("accuracy after 3 epochs:", score)
    return score


if __name__ == "__main__":
    main()
