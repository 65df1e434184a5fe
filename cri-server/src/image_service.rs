//! The CRI `ImageService`: translates CRI image calls into `imagestore` calls.

use proto::cri::{self, image_service_server::ImageService};
use tonic::{Request, Response, Status};

/// Serves `runtime.v1.ImageService`.
#[derive(Debug, Default)]
pub struct Images {}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented yet by cri-systemd (image service issue)"))
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        _: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        Err(not_yet("ListImages"))
    }
    async fn image_status(
        &self,
        _: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        Err(not_yet("ImageStatus"))
    }
    async fn pull_image(
        &self,
        _: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        Err(not_yet("PullImage"))
    }
    async fn remove_image(
        &self,
        _: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        Err(not_yet("RemoveImage"))
    }
    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        Err(not_yet("ImageFsInfo"))
    }
}
